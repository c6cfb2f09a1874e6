# S6 for Python: RST signatures for our tests.
# Refused: RST+ACK, sequence 0, IP id 0, acknowledging the SYN.
0:64:1:40:.:K0ZA:Linux:S6 test refused
# A RST of an established connection, no ACK.
*:64:1:40:.:.:Linux:S6 test reset
# A RST with ACK of an established connection.
*:64:1:40:.:KA:Linux:S6 demo reset with ACK
