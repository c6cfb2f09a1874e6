# S6 for Python: FIN signatures for our tests.
# A FIN with ACK and timestamps from the test Linux stack.
S4:64:1:52:N,N,T:AFTN:Linux:S6 test FIN A
# Without timestamps.
%512:64:1:40:.:AFN:Linux:S6 test FIN plain
# Any window, no options: the catch-all FIN with ACK.
*:64:1:40:.:AFN:Linux:S6 demo FIN
