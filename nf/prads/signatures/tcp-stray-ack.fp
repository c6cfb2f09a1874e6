# S6 for Python: stray-ACK signatures for our tests (prads has this detection off by default).
*:64:1:*:N,N,T:AT:Linux:S6 test stray ACK
