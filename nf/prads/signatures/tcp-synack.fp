# S6 for Python: SYN+ACK signatures for our tests (wss:ttl:df:size:opts:quirks:genre:details).
S4:64:1:60:M*,S,T,N,W7:AT:Linux:S6 test server A
S20:64:1:60:M*,S,T,N,W6:AT:Linux:S6 test server B
%1024:128:1:52:M*,N,W8,N,N,S:A:Windows:S6 test server D
65535:64:1:44:M*:A:BSD:S6 test server F
# bench.traffic's servers: a fixed large window, SACK then three NOPs.
65160:64:1:52:M*,S,N,N,N,W7:A:Linux:S6 demo server
