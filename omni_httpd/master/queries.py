"""The few SQL statements the daemon itself issues. Everything else lives in sql/*.sql."""

NOTIFY_CHANNEL = "omni_httpd_reload"

LISTEN = "LISTEN " + NOTIFY_CHANNEL

# One row per listener with the handler it serves (the lowest attached handler id).
LOAD_CONFIGURATION = """
SELECT l.id, host(l.address), l.port, l.protocol::text, h.id, h.query, h.role_name::text
FROM omni_httpd.listeners l
LEFT JOIN LATERAL (
    SELECT hd.id, hd.query, hd.role_name
    FROM omni_httpd.listeners_handlers lh
    JOIN omni_httpd.handlers hd ON hd.id = lh.handler_id
    WHERE lh.listener_id = l.id
    ORDER BY hd.id
    LIMIT 1
) h ON true
ORDER BY l.id
"""

# Every route of every router (sql/009_routes.sql), in the order they are tried:
# priority first (higher first), then router, then the router's own row order.
LOAD_ROUTES = """
SELECT r.router::pg_catalog.text, r.router::pg_catalog.oid::pg_catalog.int8, r.route,
       r.protocol, r.username, r.password, r.hostname, r.port, r.pathname, r.search, r.hash,
       r.method, r.handler::pg_catalog.int8, r.handler_text, r.priority, r.problem
FROM omni_httpd._routes() r
ORDER BY r.problem IS NULL, r.priority DESC, r.router::pg_catalog.oid, r.route_position
"""

# Bookkeeping: does not request a reload (the trigger ignores effective_port-only updates).
SET_EFFECTIVE_PORT = """
UPDATE omni_httpd.listeners SET effective_port = %s
WHERE id = %s AND effective_port IS DISTINCT FROM %s
"""

RECORD_RELOAD = "INSERT INTO omni_httpd.configuration_reloads DEFAULT VALUES"

LAST_RELOAD = "SELECT max(happened_at) FROM omni_httpd.configuration_reloads"

# Static file mounts (sql/011_static_files.sql); the roots they name are checked against
# --static-root by master/static_config.py.
LOAD_STATIC_FILES = """
SELECT listener_id, url_prefix, root, index_file, listing, cache_control
FROM omni_httpd.static_files
ORDER BY listener_id, url_prefix
"""
