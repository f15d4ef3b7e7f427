-- Schema omni_http: HTTP vocabulary shared by requests and responses.
--
-- Plain SQL / PL/pgSQL only: this must install on any PostgreSQL >= 13, as the owner of
-- the database, without superuser rights or C extensions.

CREATE SCHEMA omni_http;
GRANT USAGE ON SCHEMA omni_http TO PUBLIC;

CREATE TYPE omni_http.http_method AS ENUM (
    'GET', 'HEAD', 'POST', 'PUT', 'DELETE', 'CONNECT', 'OPTIONS', 'TRACE', 'PATCH'
);

CREATE TYPE omni_http.http_header AS (name text, value text);

CREATE DOMAIN omni_http.http_headers AS omni_http.http_header[];

CREATE FUNCTION omni_http.http_header(name text, value text)
    RETURNS omni_http.http_header
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT ROW($1, $2)::omni_http.http_header $$;

-- Header lookups are called by handlers on every request: PL/pgSQL keeps its plans for
-- the session, where a non-inlinable SQL function would be planned on every call.

-- The value of the first header called `name`, compared without regard to letter case.
CREATE FUNCTION omni_http.http_header_get(headers omni_http.http_header[], name text)
    RETURNS text
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
DECLARE
    header omni_http.http_header;
    wanted text := lower($2);
BEGIN
    IF $1 IS NULL THEN
        RETURN NULL;
    END IF;
    FOREACH header IN ARRAY $1 LOOP
        IF lower(header.name) = wanted THEN
            RETURN header.value;
        END IF;
    END LOOP;
    RETURN NULL;
END
$$;

-- The values of every header called `name` (any letter case), in order.
CREATE FUNCTION omni_http.http_header_get_all(headers omni_http.http_header[], name text)
    RETURNS SETOF text
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
DECLARE
    header omni_http.http_header;
    wanted text := lower($2);
BEGIN
    IF $1 IS NULL THEN
        RETURN;
    END IF;
    FOREACH header IN ARRAY $1 LOOP
        IF lower(header.name) = wanted THEN
            RETURN NEXT header.value;
        END IF;
    END LOOP;
END
$$;
