-- Schema omni_httpd: static files (docs/sql-api.md, "Static files").
--
-- A row maps a URL prefix of a listener to a *named* root directory. The names and the
-- directories they stand for come only from the daemon's command line (`--static-root
-- NAME=DIR`): a database role can choose which of those directories a listener serves
-- under which prefix, never a path on the daemon's host. A row naming a root the daemon
-- does not know is logged by the daemon and not served.
--
-- The workers serve these requests from disk themselves, before (and instead of) the
-- listener's handler, without a database round trip.

CREATE TABLE omni_httpd.static_files (
    listener_id integer NOT NULL REFERENCES omni_httpd.listeners (id) ON DELETE CASCADE,
    -- Requests whose path is this prefix or lies below it (segment-wise: '/static'
    -- matches '/static' and '/static/a.css', not '/statics') are served from `root`.
    -- Written as the client sends it (percent-encoding is not decoded for the match);
    -- '/' serves the whole listener. A trailing '/' is allowed and means the same.
    url_prefix text NOT NULL
        CONSTRAINT static_files_url_prefix_check CHECK (
            url_prefix ~ '^/([^/?#%\\[:cntrl:][:space:]]+/?)*$'
            AND url_prefix !~ '(^|/)\.\.?(/|$)'
            AND url_prefix !~ '//'),
    -- A name given with --static-root NAME=DIR.
    root text NOT NULL
        CONSTRAINT static_files_root_check CHECK (root ~ '^[A-Za-z0-9_.-]+$'),
    -- Served for a request naming a directory; NULL: none.
    index_file text DEFAULT 'index.html'
        CONSTRAINT static_files_index_file_check CHECK (
            index_file ~ '^[^/\\[:cntrl:]]+$' AND index_file NOT IN ('.', '..')),
    -- A directory without an index file answers an HTML listing (else 404).
    listing boolean NOT NULL DEFAULT false,
    -- Sent as Cache-Control with every file (and 304) under this prefix; NULL: none.
    cache_control text
        CONSTRAINT static_files_cache_control_check CHECK (cache_control !~ '[[:cntrl:]]'),
    PRIMARY KEY (listener_id, url_prefix)
);

CREATE TRIGGER static_files_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON omni_httpd.static_files
    FOR EACH STATEMENT EXECUTE FUNCTION omni_httpd._configuration_changed();
