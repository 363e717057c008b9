"""The self-documenting ``mailbag.toml`` that ``mailbag init`` writes.

Every key appears with its default value and a sentence on what it does, so
an administrator can tune the server by reading one file.  A test loads this
template and checks that every key in it is accepted and equals the default
(a documented key that the code ignores would be a lie).
"""

from __future__ import annotations

TEMPLATE = """\
# mailbag configuration (TOML). Every setting is shown with its default.
# Relative paths are relative to the directory of this file.
# Check it with:  mailbag check -c {config_name}   (errors name the key at fault)

[server]
# Name used in the greeting's APOP timestamp (<pid.n.clock@hostname>).
# Empty means the machine's host name.
hostname = "{hostname}"
# Text of the +OK greeting.
greeting = "mailbag POP3 server ready."
# Plain POP3 listeners (STLS is offered on them when [tls] has a certificate).
# The standard port is 110; ports below 1024 need root.
listen = [{listen}]
# Implicit-TLS listeners (POP3S, RFC 8314), standard port 995.
listen_tls = [{listen_tls}]
# Load balancers (HAProxy with send-proxy / send-proxy-v2) in front of this
# node: addresses or networks, e.g. ["10.0.0.5", "10.1.0.0/24"]. A connection
# from one of them must start with a PROXY protocol header (v1 or v2, before
# TLS on listen_tls); the client address in it is then used for throttling,
# plaintext_networks, connection caps and logs (POP3, POP3S and LMTP).
# A connection from them without a valid header is closed; a header from
# anyone else is refused. Empty: no proxies, every header is refused.
trusted_proxies = []

[tls]
# Certificate chain and private key (PEM). `mailbag init` made a self-signed
# pair; replace it with a real one (e.g. from Let's Encrypt) for production.
cert = "tls/cert.pem"
key = "tls/key.pem"
# Offer STLS (RFC 2595) on the plain listeners.
stls = true

[storage]
# Storage backend, by name. "maildir": one Maildir per user on local disk.
# "postgres": the database of [database], shared by any number of nodes
# (create its schema first with `mailbag db init`; see docs/postgres.md).
# Other backends take their own settings as further keys of this section
# (a key the chosen backend does not know is an error naming it).
backend = "maildir"
# Where each user's Maildir lives (maildir backend). {{user}} is the account
# name; {{local}} and {{domain}} are its parts for name@domain accounts.
maildir = "mail/{{user}}/Maildir"
# Largest message accepted for delivery, in octets (0 = no limit).
max_message_size = 52428800

[auth]
# Where accounts live: "file" (the users file below) or "postgres" (the users
# table of [database]; every node sees a change at once).
backend = "file"
# Users file: "name:{{SCHEME}}hash" per line, compatible with Dovecot's passwd-file.
# Manage it with `mailbag user add|passwd|del|list`.
users_file = "users"
# Logins "name" and "name@default_domain" reach the same account ("" = off).
default_domain = ""
# Networks where USER/PASS and AUTH PLAIN are allowed without TLS
# (like Dovecot's disable_plaintext_auth = yes, with loopback trusted).
plaintext_networks = ["127.0.0.0/8", "::1/128"]
# Seconds before a failed login is answered (unknown users look the same).
failure_delay = 2.0
# Repeated failures from one address or for one account make later attempts
# wait longer, doubling up to this many seconds. Nobody is ever locked out.
max_failure_delay = 15.0
# Seconds after which failure counters are forgotten.
failure_window = 900.0
# Known-good networks (NIST SP 800-63B 5.2.2): an account's logins from a
# network it logged in from successfully within this many seconds (30 days)
# are never delayed, whatever others tried; wrong passwords from there still
# wait. 0 = off. See docs/security.md.
known_good_ttl = 2592000.0
# What counts as one network: IPv4 /24 and IPv6 /64 by default (32 and 128
# would remember single addresses).
known_good_ipv4_prefix = 24
known_good_ipv6_prefix = 64
# Where known-good networks survive restarts (a small JSON file, mode 0600;
# "" = in memory only).
known_good_file = "known-good.json"
# Seconds a successful password check is remembered (as a keyed hash, never
# the password), so polling clients do not pay Argon2 each time. A changed
# password applies at the next login. 0 = no cache.
cache_ttl = 300.0
# Accounts the authentication cache holds at most.
cache_size = 100000

[limits]
# Autologout after this many idle seconds once logged in (RFC 1939: >= 600).
idle_timeout = 600.0
# Seconds a client has to log in, counted from connect.
login_timeout = 60.0
# Concurrent connections in total, and from one client address.
max_connections = 5000
max_connections_per_ip = 50
# Longest command line in octets, CRLF included (RFC 2449: 255).
max_command_line = 255
# Longest SASL continuation line (OAuth-sized tokens need more than 255).
max_sasl_line = 16384
# Close the connection after this many errors in a row.
max_errors = 10
# Close the connection after this many failed logins.
max_auth_failures = 3
# On SIGTERM/SIGINT, seconds open sessions get to finish before they are cut
# (a cut session never applies its deletions).
shutdown_grace = 10.0

[process]
# When started as root, mailbag binds its ports and then switches to this
# account before it reads a single network byte ("" = keep running as started).
user = ""
# Group to switch to ("" = the user's primary group).
group = ""
# Serving as root is refused unless this is true. Leave it false.
allow_root = false
# File creation mask: 0o077 makes mail files 0600 and directories 0700.
umask = 0o077

[metrics]
# HTTP endpoint with Prometheus metrics (/metrics) and a health check
# (/healthz), e.g. "127.0.0.1:9110". "" = off. It has no authentication:
# keep it on loopback or a private network. Needs: pip install 'mailbag[metrics]'.
listen = ""

[lmtp]
# LMTP (RFC 2033) listeners for mail handed over by the MTA, e.g. ["127.0.0.1:24"]
# (24 is the standard LMTP port). LMTP has no authentication: listen on
# loopback only, or use the Unix socket below. [] and "" = LMTP off.
listen = []
# Unix socket for LMTP, e.g. "/var/spool/postfix/private/mailbag" ("" = none).
socket = ""
# Permissions of the socket file: the MTA's user must be able to connect.
socket_mode = 0o660
# Seconds to wait for the MTA's next command or data (RFC 5321: at least 300).
timeout = 300.0
# Concurrent LMTP connections; more get "421 4.3.2" and the MTA retries.
max_connections = 100

[quota]
# Default limits for users whose users-file line has no quota_bytes= or
# quota_messages= field, in octets as POP3 counts them and in messages
# (0 = unlimited). A message that would exceed a quota is refused, never cut.
bytes = 0
messages = 0
# Over quota: false = refuse permanently (552 5.2.2, the sender gets a bounce);
# true = refuse temporarily (452 4.2.2, the MTA retries until mail is collected).
tempfail = false

[database]
# PostgreSQL, used only when storage.backend or auth.backend is "postgres".
# A libpq URI; the password may also come from ~/.pgpass or PGPASSWORD.
# Several hosts with target_session_attrs=read-write follow a failover, e.g.
# "postgresql://mailbag@db1,db2/mailbag?target_session_attrs=read-write".
dsn = ""
# Connections per node (each node needs only a few, however many sessions it
# serves: a session holds a connection only while a query runs).
pool_min_size = 2
pool_max_size = 10
# Seconds to wait for a connection, and for one statement, before giving up
# with a temporary error (-ERR [SYS/TEMP], 451 4.3.0).
connect_timeout = 5.0
command_timeout = 30.0
# Maildrop locks are leases renewed by one heartbeat per node: a node that
# dies or loses the database frees its locks after this many seconds, and
# can never commit a QUIT after it.
lease_time = 30.0
# Prefix of this node's lock-owner id in the leases table ("" = host name).
node_name = ""

[log]
# debug, info, warning or error.
level = "info"
# "text" for people, "json" for log shippers (one object per line).
format = "text"
"""


def render(
    *,
    hostname: str = "",
    listen: tuple[str, ...] = ("0.0.0.0:110",),
    listen_tls: tuple[str, ...] = ("0.0.0.0:995",),
    config_name: str = "mailbag.toml",
) -> str:
    """Fill the template."""
    return TEMPLATE.format(
        hostname=hostname,
        listen=", ".join(f'"{a}"' for a in listen),
        listen_tls=", ".join(f'"{a}"' for a in listen_tls),
        config_name=config_name,
    )
