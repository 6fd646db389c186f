-- The catalog database and its two roles, neither a superuser (run once, as a superuser):
--   owner: owns the database and so the schema; `catalog migrate` and `catalog seed` run as it;
--   app:   the service, the invalidator and the outbox relay; reads and writes rows, nothing else
--          (no CREATE, ALTER, DROP or TRUNCATE, no other database).
-- psql variables: owner, app, database, owner_password, app_password (see init-roles.sh).
\set ON_ERROR_STOP on

CREATE ROLE :"owner" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION
    PASSWORD :'owner_password';
CREATE ROLE :"app" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION
    PASSWORD :'app_password';
CREATE DATABASE :"database" OWNER :"owner";
REVOKE ALL ON DATABASE :"database" FROM PUBLIC;
GRANT CONNECT ON DATABASE :"database" TO :"app";

\connect :"database"
-- PostgreSQL 15: the public schema belongs to the database owner and PUBLIC cannot create in it.
REVOKE ALL ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO :"app";
-- Whatever the owner's migrations create: rows and sequences for the app, nothing more.
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO :"app";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public
    GRANT USAGE, SELECT ON SEQUENCES TO :"app";
