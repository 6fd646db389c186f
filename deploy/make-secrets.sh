#!/bin/sh
# Makes the secrets of docker-compose.yml in DIR (default: ./secrets), one file each; a file
# that exists is kept, so running it again changes nothing. Values are random (hex, so URLs
# need no escaping). DIR is private to you (0700); its files are 0644 because compose mounts
# them as they are and the containers read them as their own users (catalog 10001, postgres,
# redis). To rotate one, delete its file(s), run this again and recreate the stack.
set -eu
dir=${1:-secrets}
umask 077
mkdir -p "$dir"
chmod 700 "$dir"

random() { od -An -N24 -tx1 /dev/urandom | tr -d ' \n'; }
make() {  # make NAME VALUE: write VALUE to DIR/NAME unless it exists
    [ -e "$dir/$1" ] && return 0
    printf '%s\n' "$2" > "$dir/$1"
    chmod 644 "$dir/$1"
    echo "made $dir/$1"
}
read_secret() { head -n 1 "$dir/$1"; }

make postgres_password "$(random)"
make db_owner_password "$(random)"
make db_app_password "$(random)"
make redis_service_password "$(random)"
make redis_invalidator_password "$(random)"
make page_token_secret "$(random)"
make write_tokens "$(random)"
make database_owner_url \
    "postgresql+psycopg://catalog_owner:$(read_secret db_owner_password)@postgres:5432/catalog"
make database_app_url \
    "postgresql+psycopg://catalog_app:$(read_secret db_app_password)@postgres:5432/catalog"
make redis_service_url \
    "redis://catalog-service:$(read_secret redis_service_password)@redis:6379/0"
make redis_invalidator_url \
    "redis://catalog-invalidator:$(read_secret redis_invalidator_password)@redis:6379/0"
