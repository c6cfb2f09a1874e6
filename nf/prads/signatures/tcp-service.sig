# S6 for Python: server application signatures for our tests.
# Format (as prads reads it): service,v/application/version/info/,regex (PCRE)
ssh,v/OpenSSH/$2/Protocol $1/,SSH-([.\d]+)-OpenSSH[_-](\S+)
ssh,v/Dropbear sshd/$2/Protocol $1/,SSH-([.\d]+)-dropbear_(\S+)
http,v/Apache/$1/$2/,Server: Apache\/([\S]+)[\s]+\((.*)\)
http,v/Apache/$1//,Server: Apache\/([\S]+)[\r\n]
http,v/nginx/$1//,Server: nginx\/([\d.]+)
http,v/Generic web server///,^HTTP/1\.[01] \d\d\d
smtp,v/Postfix SMTP///,^220 [-.\w]+ ESMTP Postfix
ftp,v/vsftpd/$1//,^220 \(vsFTPd ([.\d]+)\)
