#!/usr/bin/env bash
# nginx (Debian nginx-light, sendfile on): the peer the benchmarks measure the disk tier against.
source "$(dirname "$0")/lib.sh"

# apt_install keeps the package's system nginx (port 80) from starting; the benchmarks run their own.
install() { apt_install nginx-light; }

start() {
  local state=$1 dir="$1/nginx" port
  port=$(free_port)
  mkdir -p "$dir/root" "$dir/tmp"
  cat >"$dir/nginx.conf" <<CONF
daemon off;
# The state directory is private to root (mktemp -d); workers must read it.
user root;
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 256; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  client_body_temp_path $dir/tmp;
  proxy_temp_path $dir/tmp;
  fastcgi_temp_path $dir/tmp;
  uwsgi_temp_path $dir/tmp;
  scgi_temp_path $dir/tmp;
  server {
    listen 127.0.0.1:$port;
    root $dir/root;
  }
}
CONF
  spawn "$state" nginx nginx -c "$dir/nginx.conf" -e "$dir/error.log"
  wait_for 20 "nginx" curl -s -o /dev/null "http://127.0.0.1:$port/"
  export_env "$state" NGINX_URL "http://127.0.0.1:$port"
  export_env "$state" NGINX_ROOT "$dir/root"
  log "nginx at http://127.0.0.1:$port"
}

"$@"
