-- Schema omni_httpd, part 5: the welcome page, and the default listener the daemon
-- creates on its first start (unless --no-init).

CREATE FUNCTION omni_httpd._html_escape(text)
    RETURNS text
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$
    SELECT replace(replace(replace(replace(replace($1,
        '&', '&amp;'), '<', '&lt;'), '>', '&gt;'), '"', '&quot;'), '''', '&#39;')
$$;

CREATE FUNCTION omni_httpd.default_page(request omni_httpd.http_request)
    RETURNS SETOF omni_httpd.http_outcome
    LANGUAGE plpgsql
AS $$
DECLARE
    backends int;
    commits bigint;
BEGIN
    SELECT d.numbackends, d.xact_commit INTO backends, commits
    FROM pg_catalog.pg_stat_database d
    WHERE d.datname = current_database();
    RETURN NEXT omni_httpd.http_response(
        format($html$<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>omni_httpd</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 46rem; margin: 3rem auto; padding: 0 1rem; color: #222; }
dt { font-weight: bold; margin-top: 0.8rem; }
code { background: #f3f3f3; padding: 0.1rem 0.3rem; }
</style>
</head>
<body>
<h1>omni_httpd is running</h1>
<p>This page is served by the default handler. Change <code>omni_httpd.handlers</code>
to serve your own.</p>
<dl>
<dt>Database</dt><dd>%s</dd>
<dt>Backends</dt><dd>%s</dd>
<dt>Committed transactions</dt><dd>%s</dd>
<dt>Server version</dt><dd>%s</dd>
<dt>Request</dt><dd>%s %s</dd>
</dl>
</body>
</html>
$html$,
            omni_httpd._html_escape(current_database()),
            omni_httpd._html_escape(coalesce(backends::text, '?')),
            omni_httpd._html_escape(coalesce(commits::text, '?')),
            omni_httpd._html_escape(version()),
            omni_httpd._html_escape(coalesce(request.method::text, '')),
            omni_httpd._html_escape(coalesce(request.path, ''))),
        200,
        ARRAY[omni_http.http_header('content-type', 'text/html; charset=utf-8')]);
END
$$;

-- Remembers that the default listener was created, so that an operator who deletes it
-- does not get it back at the next start.
CREATE TABLE omni_httpd.default_initialization (
    done boolean PRIMARY KEY DEFAULT true CHECK (done),
    happened_at timestamptz NOT NULL DEFAULT now()
);

-- Create the default listener and its handler, once in the life of the database.
-- Returns whether it did so now. Two daemons starting at once: the second one waits
-- for the first one's transaction and then does nothing.
CREATE FUNCTION omni_httpd._initialize_default(address inet, port int)
    RETURNS boolean
    LANGUAGE plpgsql
AS $$
BEGIN
    INSERT INTO omni_httpd.default_initialization DEFAULT VALUES ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    WITH listener AS (
        INSERT INTO omni_httpd.listeners (address, port) VALUES ($1, $2) RETURNING id
    ), handler AS (
        INSERT INTO omni_httpd.handlers (query)
        VALUES ('SELECT omni_httpd.default_page(request.*::omni_httpd.http_request) FROM request')
        RETURNING id
    )
    INSERT INTO omni_httpd.listeners_handlers (listener_id, handler_id)
    SELECT listener.id, handler.id FROM listener, handler;
    RETURN true;
END
$$;
