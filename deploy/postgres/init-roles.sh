#!/bin/sh
# Run once by the postgres image on an empty data directory (/docker-entrypoint-initdb.d):
# creates the catalog database and its owner and application roles (roles.sql), with the
# passwords of the mounted secrets. Nothing here is printed.
set -eu
psql --no-psqlrc --quiet --username "$POSTGRES_USER" --dbname postgres \
    --set owner=catalog_owner --set app=catalog_app --set database=catalog \
    --set owner_password="$(cat /run/secrets/db_owner_password)" \
    --set app_password="$(cat /run/secrets/db_app_password)" \
    --file /etc/catalog/roles.sql
