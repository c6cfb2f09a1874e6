# S6 for Python: MTU names for our tests (mtu,"name").  prads 0.3.3 prints link names
# from a table compiled into it, not from this file.
576,"small link"
1400,"tunnel"
1500,"ethernet"
9000,"jumbo"
