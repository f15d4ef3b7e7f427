-- Schema omni_httpd, part 1: what a handler receives (http_request) and what it answers
-- (http_outcome: a response, an abort or a proxy).
--
-- The schema itself is created by the migration runner (it holds the version table).

GRANT USAGE ON SCHEMA omni_httpd TO PUBLIC;

CREATE TYPE omni_httpd.http_request AS (
    method omni_http.http_method,
    path text,
    query_string text,
    body bytea,
    headers omni_http.http_header[]
);

CREATE FUNCTION omni_httpd.http_request(
    path text,
    method omni_http.http_method DEFAULT 'GET',
    query_string text DEFAULT NULL,
    body bytea DEFAULT NULL,
    headers omni_http.http_header[] DEFAULT ARRAY[]::omni_http.http_header[])
    RETURNS omni_httpd.http_request
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT ROW($2, $1, $3, $4, $5)::omni_httpd.http_request $$;

CREATE TYPE omni_httpd.http_response AS (
    body bytea,
    status smallint,
    headers omni_http.http_header[]
);

CREATE TYPE omni_httpd.http_proxy AS (
    url text,
    preserve_host boolean
);

-- Exactly one field is set: `response`, `abort` (true) or `proxy`.
CREATE TYPE omni_httpd.http_outcome AS (
    response omni_httpd.http_response,
    abort boolean,
    proxy omni_httpd.http_proxy
);

-- So that `(omni_httpd.http_response(...)::omni_httpd.http_response).*` works. An abort
-- or proxy outcome casts to NULL.
CREATE FUNCTION omni_httpd._http_outcome_response(outcome omni_httpd.http_outcome)
    RETURNS omni_httpd.http_response
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$ SELECT ($1).response $$;

CREATE CAST (omni_httpd.http_outcome AS omni_httpd.http_response)
    WITH FUNCTION omni_httpd._http_outcome_response(omni_httpd.http_outcome)
    AS ASSIGNMENT;

-- A response. The body is sent as bytes: bytea as is (application/octet-stream),
-- json/jsonb as their text (application/json), every other type as its text
-- representation, i.e. what its output function prints (text/plain; charset=utf-8).
-- The inferred content-type header is appended to the caller's headers unless those
-- already have one (in any letter case). A NULL body gets no content type.
--
-- PL/pgSQL, not SQL: handlers call this on every request and PL/pgSQL caches its plans
-- per session (one compiled instance per body type). The body is never assigned to a
-- variable nor passed through format() when it is text: with a 256 KiB body each of
-- those copies cost more than everything else here together.
CREATE FUNCTION omni_httpd.http_response(
    body anycompatible DEFAULT NULL,
    status int DEFAULT 200,
    headers omni_http.http_header[] DEFAULT NULL)
    RETURNS omni_httpd.http_outcome
    LANGUAGE plpgsql STABLE PARALLEL SAFE
AS $$
DECLARE
    body_type regtype;
    content_type text;
    all_headers omni_http.http_header[] := coalesce($3, ARRAY[]::omni_http.http_header[]);
    header omni_http.http_header;
BEGIN
    -- num_nonnulls, not IS NOT NULL: a composite body with NULL fields is still a body.
    IF num_nonnulls($1) = 0 THEN
        RETURN ROW(ROW(NULL, coalesce($2, 200), all_headers)::omni_httpd.http_response,
                   NULL, NULL)::omni_httpd.http_outcome;
    END IF;
    body_type := pg_typeof($1);
    content_type := CASE WHEN body_type = 'bytea'::regtype THEN 'application/octet-stream'
                         WHEN body_type IN ('json'::regtype, 'jsonb'::regtype) THEN 'application/json'
                         ELSE 'text/plain; charset=utf-8' END;
    FOREACH header IN ARRAY all_headers LOOP
        IF lower(header.name) = 'content-type' THEN
            content_type := NULL;
            EXIT;
        END IF;
    END LOOP;
    IF content_type IS NOT NULL THEN
        all_headers := all_headers || omni_http.http_header('content-type', content_type);
    END IF;
    -- PL/pgSQL parses a statement when it first runs it, so each branch below is only
    -- ever compiled for the body types that reach it.
    IF body_type = 'bytea'::regtype THEN
        RETURN ROW(ROW($1, coalesce($2, 200), all_headers)::omni_httpd.http_response,
                   NULL, NULL)::omni_httpd.http_outcome;
    ELSIF body_type IN ('text'::regtype, 'character varying'::regtype) THEN
        -- for these ::text is exactly the output function's text, without a copy
        RETURN ROW(ROW(convert_to($1::text, 'UTF8'), coalesce($2, 200), all_headers)::omni_httpd.http_response,
                   NULL, NULL)::omni_httpd.http_outcome;
    END IF;
    RETURN ROW(ROW(convert_to(format('%s', $1), 'UTF8'), coalesce($2, 200), all_headers)::omni_httpd.http_response,
               NULL, NULL)::omni_httpd.http_outcome;
END
$$;

-- Close the connection without answering.
CREATE FUNCTION omni_httpd.abort()
    RETURNS omni_httpd.http_outcome
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT ROW(NULL, true, NULL)::omni_httpd.http_outcome $$;

-- Forward the request to `url` and relay the answer; keep the incoming Host header
-- unless preserve_host is false.
CREATE FUNCTION omni_httpd.http_proxy(url text, preserve_host boolean DEFAULT true)
    RETURNS omni_httpd.http_outcome
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT ROW(NULL, NULL, ROW($1, coalesce($2, true))::omni_httpd.http_proxy)::omni_httpd.http_outcome $$;
