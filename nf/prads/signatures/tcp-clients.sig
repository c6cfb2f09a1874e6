# S6 for Python: client application signatures for our tests.
http,v/$1///,User-Agent\x3a ([^\r\n]+)\r
ssh,v/OpenSSH/$2/Protocol $1/,SSH-([.\d]+)-OpenSSH[_-](\S+)
ssh,v/PuTTY/$2/Protocol $1/,SSH-([.\d]+)-PuTTY_(\S+)
smtp,v/SMTP client//$1/,^EHLO ([-.\w]+)
