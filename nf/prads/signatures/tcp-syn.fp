# S6 for Python: a small OS signature set for SYN packets, written for our tests.
# Format (p0f v2, as prads reads it): wss:ttl:df:size:opts:quirks:genre:details
# The values describe made-up stacks; they are not a survey of real systems.

# Window a multiple of the MSS, timestamps, window scale 7.
S4:64:1:60:M*,S,T,N,W7:.:Linux:S6 test stack A (wscale 7)
# Same layout, window scale 6: a different signature.
S10:64:1:60:M*,S,T,N,W6:.:Linux:S6 test stack B (wscale 6)
# A zero timestamp.
S4:64:1:60:M*,S,T0,N,W7:.:Linux:S6 test stack C (zero stamp)
# Window a multiple of 1024, no timestamps.
%1024:128:1:52:M*,N,W8,N,N,S:.:Windows:S6 test stack D
# Fixed window, MSS modulo, a userland prefix.
16384:64:0:44:M%4:.:-Embedded:S6 test stack E (no DF)
# Window a multiple of the MTU.
T3:64:1:48:M*,N,N,S:.:BSD:S6 test stack F
# Size wildcard: only for SYNs of 100 bytes or more.
32768:64:1:*:M*,N,W2,N,N,T,S,N,N:D:Odd:S6 test stack G (data in the SYN)
# A generic catch-all for a lone MSS option.
*:64:1:44:M*:.:@Generic:S6 lone MSS
# Quirks: IP options and the urgent pointer.
8192:255:1:48:M1460:IU:Router:S6 test stack H (quirky)
# No-detail prefix: the TTL bound is not checked.
4096:32:1:44:M536:.:*Tiny:S6 test stack I
# A large window (44 segments), as bench.traffic's clients send.
S44:64:1:60:M*,S,T,N,W7:.:Linux:S6 demo client (large window)
