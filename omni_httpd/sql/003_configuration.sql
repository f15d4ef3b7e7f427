-- Schema omni_httpd, part 2: the configuration tables the daemon follows, and how a
-- change to them reaches the daemon (NOTIFY omni_httpd_reload, delivered at commit).

CREATE TYPE omni_httpd.http_protocol AS ENUM ('http', 'https');

CREATE TABLE omni_httpd.listeners (
    id integer PRIMARY KEY GENERATED ALWAYS AS IDENTITY,
    address inet NOT NULL DEFAULT '127.0.0.1',
    port integer NOT NULL DEFAULT 80 CHECK (port BETWEEN 0 AND 65535),
    -- Written by the daemon: the port actually bound (port 0 means "any free port").
    effective_port integer NOT NULL DEFAULT 0,
    protocol omni_httpd.http_protocol NOT NULL DEFAULT 'http'
);

-- Can the current user (the one inserting or updating a handler) become `role_name`:
-- itself, a role it is a member of (with the right to SET ROLE to it on PostgreSQL 16
-- and later), or any role for a superuser. An unknown role is refused, not an error.
CREATE FUNCTION omni_httpd._can_become(role_name name)
    RETURNS boolean
    LANGUAGE plpgsql STABLE
AS $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles r WHERE r.rolname = $1) THEN
        RETURN false;
    END IF;
    IF current_setting('server_version_num')::int >= 160000 THEN
        RETURN pg_catalog.pg_has_role(current_user, $1, 'SET');
    END IF;
    RETURN pg_catalog.pg_has_role(current_user, $1, 'MEMBER');
END
$$;

CREATE TABLE omni_httpd.handlers (
    id integer PRIMARY KEY GENERATED ALWAYS AS IDENTITY,
    query text NOT NULL,
    role_name name NOT NULL DEFAULT current_user
        CONSTRAINT handlers_role_name_check CHECK (omni_httpd._can_become(role_name))
);

CREATE TABLE omni_httpd.listeners_handlers (
    listener_id integer NOT NULL REFERENCES omni_httpd.listeners (id) ON DELETE CASCADE,
    handler_id integer NOT NULL REFERENCES omni_httpd.handlers (id) ON DELETE CASCADE,
    PRIMARY KEY (listener_id, handler_id)
);
CREATE INDEX listeners_handlers_handler_id ON omni_httpd.listeners_handlers (handler_id);

-- One row per (re)load fully applied by every worker; written by the daemon.
CREATE TABLE omni_httpd.configuration_reloads (
    id integer PRIMARY KEY GENERATED ALWAYS AS IDENTITY,
    happened_at timestamp NOT NULL DEFAULT now()
);

-- Reload requests. NOTIFY is delivered when (and only if) the transaction commits, and
-- one transaction's identical notifications are folded into one.
CREATE FUNCTION omni_httpd.reload_configuration()
    RETURNS boolean
    LANGUAGE sql
AS $$
    SELECT pg_catalog.pg_notify('omni_httpd_reload', '');
    SELECT true;
$$;

CREATE FUNCTION omni_httpd._configuration_changed()
    RETURNS trigger
    LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM omni_httpd.reload_configuration();
    RETURN NULL;
END
$$;

-- The daemon writes listeners.effective_port after binding; that must not cause another
-- reload (it would loop). So an UPDATE of listeners requests a reload only when a column
-- other than effective_port changed. (An UPDATE that changes nothing requests none.)
CREATE FUNCTION omni_httpd._listeners_updated()
    RETURNS trigger
    LANGUAGE plpgsql
AS $$
BEGIN
    IF EXISTS (SELECT o.id, o.address, o.port, o.protocol FROM old_listeners o
               EXCEPT
               SELECT n.id, n.address, n.port, n.protocol FROM new_listeners n) THEN
        PERFORM omni_httpd.reload_configuration();
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER listeners_changed
    AFTER INSERT OR DELETE OR TRUNCATE ON omni_httpd.listeners
    FOR EACH STATEMENT EXECUTE FUNCTION omni_httpd._configuration_changed();
CREATE TRIGGER listeners_updated
    AFTER UPDATE ON omni_httpd.listeners
    REFERENCING OLD TABLE AS old_listeners NEW TABLE AS new_listeners
    FOR EACH STATEMENT EXECUTE FUNCTION omni_httpd._listeners_updated();
CREATE TRIGGER handlers_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON omni_httpd.handlers
    FOR EACH STATEMENT EXECUTE FUNCTION omni_httpd._configuration_changed();
CREATE TRIGGER listeners_handlers_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON omni_httpd.listeners_handlers
    FOR EACH STATEMENT EXECUTE FUNCTION omni_httpd._configuration_changed();

-- Wait until `n` reloads have been recorded, and consume them (the n oldest rows).
-- Rows are taken as they arrive (FOR UPDATE SKIP LOCKED), so two sessions waiting at
-- the same time each consume their own. Call it outside a transaction that changed the
-- configuration: a reload is requested only when that transaction commits. Bound the
-- wait with statement_timeout if needed.
CREATE PROCEDURE omni_httpd.wait_for_configuration_reloads(n int)
    LANGUAGE plpgsql
AS $$
DECLARE
    consumed int := 0;
    taken int;
BEGIN
    WHILE consumed < coalesce(n, 0) LOOP
        WITH taken_rows AS (
            DELETE FROM omni_httpd.configuration_reloads
            WHERE id IN (SELECT r.id FROM omni_httpd.configuration_reloads r
                         ORDER BY r.id
                         LIMIT n - consumed
                         FOR UPDATE SKIP LOCKED)
            RETURNING 1
        )
        SELECT count(*) INTO taken FROM taken_rows;
        consumed := consumed + taken;
        IF consumed < n THEN
            PERFORM pg_catalog.pg_sleep(0.01);
        END IF;
    END LOOP;
END
$$;
