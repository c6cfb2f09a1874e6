# S6 for Python: UDP application signatures for our tests.
domain,v/DNS response without error///,^..\x81\x80\x00\x01
domain,v/DNS standard query///,^..\x01\x00\x00\x01\x00\x00
syslog,v/Syslog message/$1//,^<(\d+)>
