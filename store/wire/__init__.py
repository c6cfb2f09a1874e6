"""The wire: messages and their encoding, controller messages, errors, codes.  Pure: no
I/O, no clock, nothing of ours below it."""
