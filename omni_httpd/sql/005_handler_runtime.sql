-- Schema omni_httpd, part 4: how a worker runs a handler (see docs/architecture.md,
-- "Executing a handler").
--
-- The worker calls omni_httpd._install_handler(fname, query, role_name) once per handler
-- and configuration, then, per request, one statement:
--     SELECT * FROM pg_temp.<fname>(method, path, query_string, body,
--                                   header_names, header_values)
-- (prepared). The function is PL/pgSQL (its plan is cached for the session), SECURITY
-- DEFINER and owned by role_name (the handler runs as that role, and PostgreSQL refuses
-- SET ROLE / RESET ROLE inside it with an error the handler can catch), and returns at
-- most one flat row of omni_httpd._handler_result: no row means "no outcome" (204).
-- Read the fields of the row's kind only (for outcomes made with the API's constructors
-- the others are NULL).

CREATE TYPE omni_httpd._handler_result AS (
    kind text,              -- 'response' | 'abort' | 'proxy'
    status int,             -- response: the status, 200 when the handler gave NULL
    header_names text[],    -- response: header names, in order
    header_values text[],   -- response: header values, same order
    body bytea,             -- response: the body (NULL: no body)
    proxy_url text,         -- proxy: where to forward the request
    preserve_host boolean   -- proxy: keep the incoming Host header
);

-- Which column is the outcome is decided here, from the column types: the first column
-- of type http_outcome; else the three columns response/abort/proxy of an expanded
-- http_outcome (`SELECT * FROM omni_httpd.http_response(...)`); else the first column:
-- an http_response is taken as is, any other type becomes omni_httpd.http_response(value).
-- A handler without columns (`SELECT FROM ...`, or INSERT/UPDATE/DELETE without
-- RETURNING) still runs, and has no outcome: the function returns no row (204). So does
-- a NULL outcome (or an outcome with no field set).
CREATE FUNCTION omni_httpd._install_handler(fname text, query text, role_name name)
    RETURNS void
    LANGUAGE plpgsql
AS $$
DECLARE
    request_select constant text :=
        'SELECT $1 AS method, $2 AS path, $3 AS query_string, $4 AS body, '
        'ARRAY(SELECT ROW(h.name, h.value)::omni_http.http_header '
        'FROM unnest($5, $6) AS h(name, value)) AS headers';
    signature constant text := '(omni_http.http_method, text, text, bytea, text[], text[])';
    new_owner name := coalesce($3, current_user);
    column_types regtype[] := omni_httpd._handler_columns($2);
    width int := coalesce(array_length(column_types, 1), 0);
    outcome_column int;
    outcome text;
    aliases text;
    wrapping record;
    function_body text;
    current_owner name;
BEGIN
    IF width = 0 THEN
        outcome := 'NULL::omni_httpd.http_outcome';
    ELSE
        outcome_column := array_position(column_types, 'omni_httpd.http_outcome'::regtype);
        IF outcome_column IS NOT NULL THEN
            outcome := 'c' || outcome_column;
        ELSIF width >= 3 AND column_types[1:3] = ARRAY['omni_httpd.http_response'::regtype,
                                                  'boolean'::regtype,
                                                  'omni_httpd.http_proxy'::regtype] THEN
            outcome := 'ROW(c1, c2, c3)::omni_httpd.http_outcome';
        ELSIF column_types[1] = 'omni_httpd.http_response'::regtype THEN
            outcome := 'ROW(c1, NULL, NULL)::omni_httpd.http_outcome';
        ELSE
            outcome := 'omni_httpd.http_response(c1)';
        END IF;
        SELECT string_agg('c' || i, ', ' ORDER BY i) INTO aliases FROM generate_series(1, width) i;
    END IF;
    wrapping := omni_httpd._wrap_handler_query($2, request_select, aliases);

    -- Parameters are unnamed and there are no OUT parameters, so that no PL/pgSQL
    -- variable can be mistaken for a column of the handler (use_column covers FOUND).
    -- The outcome is flattened in one plain SELECT over the one-row CTE: no CASE per
    -- column on a computed kind (the planner would copy that expression into every
    -- column), no ORDER BY (unnest yields elements in order). Measured: this costs
    -- about half as much per request as the straightforward form.
    function_body := format(
$body$
#variable_conflict use_column
BEGIN
RETURN QUERY
%s,
omni_httpd_outcome AS (SELECT %s AS o %s LIMIT 1)
SELECT CASE WHEN (s.o).abort THEN 'abort'
            WHEN ((s.o).proxy).url IS NOT NULL THEN 'proxy'
            ELSE 'response' END::text,
       CASE WHEN (s.o).response IS DISTINCT FROM NULL
            THEN coalesce(((s.o).response).status, 200)::int END,
       CASE WHEN (s.o).response IS DISTINCT FROM NULL
            THEN ARRAY(SELECT x.name FROM unnest(((s.o).response).headers) AS x) END,
       CASE WHEN (s.o).response IS DISTINCT FROM NULL
            THEN ARRAY(SELECT x.value FROM unnest(((s.o).response).headers) AS x) END,
       ((s.o).response).body,
       ((s.o).proxy).url,
       CASE WHEN ((s.o).proxy).url IS NOT NULL
            THEN coalesce(((s.o).proxy).preserve_host, true) END
FROM omni_httpd_outcome AS s
WHERE (s.o).abort OR ((s.o).proxy).url IS NOT NULL OR (s.o).response IS DISTINCT FROM NULL;
END
$body$,
        rtrim(wrapping.wrapped, E'\n'),
        outcome,
        CASE WHEN wrapping.returns_rows THEN 'FROM omni_httpd_handler' ELSE '' END);

    EXECUTE format('CREATE OR REPLACE FUNCTION pg_temp.%I%s RETURNS SETOF omni_httpd._handler_result '
                   'LANGUAGE plpgsql SECURITY DEFINER AS %L',
                   $1, signature, function_body);
    -- CREATE OR REPLACE keeps the previous owner: compare with the actual one.
    SELECT r.rolname INTO current_owner
    FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_roles r ON r.oid = p.proowner
    WHERE p.oid = format('pg_temp.%I%s', $1, signature)::regprocedure;
    IF current_owner IS DISTINCT FROM new_owner THEN
        EXECUTE format('ALTER FUNCTION pg_temp.%I%s OWNER TO %I', $1, signature, new_owner);
    END IF;
END
$$;
