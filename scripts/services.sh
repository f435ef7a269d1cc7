#!/usr/bin/env bash
# The real servers the tests start or talk to: Debian's dovecot (IMAP), postfix's smtp-sink/smtp-source
# (SMTP benchmark peers) and the local PostgreSQL. Idempotent; never fails the run for an optional piece.
set -uo pipefail
need=()
[ -x /usr/sbin/dovecot ] || need+=(dovecot-imapd)
command -v smtp-sink >/dev/null 2>&1 || [ -x /usr/sbin/smtp-sink ] || need+=(postfix)
if [ ${#need[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections 2>/dev/null || true
  apt-get update -qq >/dev/null 2>&1 || true
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null 2>&1 \
    || echo "services.sh: could not install ${need[*]}; tests that need them will skip with a reason"
  # the test fixtures start their own dovecot on a free loopback port; the system ones are not needed
  (service dovecot stop; service postfix stop) >/dev/null 2>&1 || true
fi
if command -v pg_isready >/dev/null && ! pg_isready -q -h 127.0.0.1 -p 5432; then
  if command -v pg_ctlcluster >/dev/null; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start >/dev/null 2>&1 || true
  fi
  for _ in $(seq 1 20); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.5; done
  pg_isready -q -h 127.0.0.1 -p 5432 || echo "services.sh: PostgreSQL is not running; its tests will skip with a reason"
fi
exit 0
