-- Pipelined requests (docs/architecture.md, "Pipelining"): the DB thread may send the
-- next requests before the result of the one before has come back, each still its own
-- transaction. So the clean-up of what a request leaves in the session can no longer
-- wait for the worker to learn that the request failed: the handler function now runs
-- it itself on failure too, in an exception block, before the error goes on unchanged
-- (RAISE re-raises it with its SQLSTATE, message, detail and hint). A cancelled
-- statement (statement_timeout) and a failed assertion, which WHEN OTHERS does not
-- catch, are caught too. What a failed request leaves behind a rollback (session
-- advisory locks, SQL prepared statements, holdable cursors, sequence caches) is then
-- gone before the next request of the pipeline starts.
--
-- The function is otherwise the one of 008_confinement.sql (see there).
CREATE OR REPLACE FUNCTION omni_httpd._install_handler(fname text, query text, role_name name,
                                            column_types regtype[],
                                            OUT function_oid oid, OUT function_xmin xid)
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    request_select constant text :=
        'SELECT $1 AS method, $2 AS path, $3 AS query_string, $4 AS body, '
        'ARRAY(SELECT ROW(h.name, h.value)::omni_http.http_header '
        'FROM ROWS FROM (pg_catalog.unnest($5), pg_catalog.unnest($6)) AS h(name, value)) AS headers';
    signature constant text := '(omni_http.http_method, pg_catalog.text, pg_catalog.text, '
                               'pg_catalog.bytea, pg_catalog.text[], pg_catalog.text[])';
    new_owner name := coalesce($3, current_user);
    installer name := current_user;
    width int := coalesce(pg_catalog.array_length($4, 1), 0);
    outcome_column int;
    outcome text;
    aliases text;
    wrapping record;
    function_body text;
    qualified text := pg_catalog.format('pg_temp.%I%s', $1, signature);
BEGIN
    IF width = 0 THEN
        outcome := 'NULL::omni_httpd.http_outcome';
    ELSE
        outcome_column := pg_catalog.array_position($4, 'omni_httpd.http_outcome'::regtype);
        IF outcome_column IS NOT NULL THEN
            outcome := 'c' || outcome_column;
        ELSIF width >= 3 AND $4[1:3] = ARRAY['omni_httpd.http_response'::regtype,
                                             'boolean'::regtype,
                                             'omni_httpd.http_proxy'::regtype] THEN
            outcome := 'ROW(c1, c2, c3)::omni_httpd.http_outcome';
        ELSIF $4[1] = 'omni_httpd.http_response'::regtype THEN
            outcome := 'ROW(c1, NULL, NULL)::omni_httpd.http_outcome';
        ELSE
            outcome := 'omni_httpd.http_response(c1)';
        END IF;
        SELECT pg_catalog.string_agg('c' || i, ', ' ORDER BY i) INTO aliases
        FROM pg_catalog.generate_series(1, width) i;
    END IF;
    wrapping := omni_httpd._wrap_handler_query($2, request_select, aliases);

    -- Parameters are unnamed and there are no OUT parameters, so that no PL/pgSQL
    -- variable can be mistaken for a column of the handler (use_column covers FOUND).
    -- The outcome is flattened in one plain SELECT over the one-row CTE (measured: half
    -- the cost of a CASE per column on a computed kind). num_nonnulls(x) > 0, not
    -- `x IS DISTINCT FROM NULL`: that would look an operator up by name.
    function_body := pg_catalog.format(
$body$
#variable_conflict use_column
BEGIN
RETURN QUERY
%s,
omni_httpd_outcome AS (SELECT %s AS o %s LIMIT 1)
SELECT CASE WHEN (s.o).abort THEN 'abort'
            WHEN ((s.o).proxy).url IS NOT NULL THEN 'proxy'
            ELSE 'response' END::pg_catalog.text,
       CASE WHEN pg_catalog.num_nonnulls((s.o).response) OPERATOR(pg_catalog.>) 0
            THEN coalesce(((s.o).response).status, 200)::pg_catalog.int4 END,
       CASE WHEN pg_catalog.num_nonnulls((s.o).response) OPERATOR(pg_catalog.>) 0
            THEN ARRAY(SELECT x.name FROM pg_catalog.unnest(((s.o).response).headers) AS x) END,
       CASE WHEN pg_catalog.num_nonnulls((s.o).response) OPERATOR(pg_catalog.>) 0
            THEN ARRAY(SELECT x.value FROM pg_catalog.unnest(((s.o).response).headers) AS x) END,
       ((s.o).response).body,
       ((s.o).proxy).url,
       CASE WHEN ((s.o).proxy).url IS NOT NULL
            THEN coalesce(((s.o).proxy).preserve_host, true) END
FROM omni_httpd_outcome AS s
WHERE (s.o).abort OR ((s.o).proxy).url IS NOT NULL
   OR pg_catalog.num_nonnulls((s.o).response) OPERATOR(pg_catalog.>) 0;
PERFORM omni_httpd._after_request();
EXCEPTION WHEN OTHERS OR query_canceled OR assert_failure THEN
    PERFORM omni_httpd._after_request();
    RAISE;
END
$body$,
        pg_catalog.rtrim(wrapping.wrapped, E'\n'),
        outcome,
        CASE WHEN wrapping.returns_rows THEN 'FROM omni_httpd_handler' ELSE '' END);

    -- SET search_path FROM CURRENT takes the value set just before, without writing it
    -- into the statement.
    -- A function of that name is replaced, never reused: DROP, not CREATE OR REPLACE,
    -- which would keep its owner and privileges.
    EXECUTE pg_catalog.format('DROP FUNCTION IF EXISTS %s', qualified);
    PERFORM pg_catalog.set_config('search_path', omni_httpd._handler_search_path(), true);
    EXECUTE pg_catalog.format(
        'CREATE FUNCTION %s RETURNS SETOF omni_httpd._handler_result LANGUAGE plpgsql '
        'SECURITY DEFINER SET search_path FROM CURRENT AS %L', qualified, function_body);
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', qualified);
    IF new_owner <> installer THEN
        EXECUTE pg_catalog.format('ALTER FUNCTION %s OWNER TO %I', qualified, new_owner);
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO %I', qualified, installer);
    END IF;
    SELECT p.oid, p.xmin INTO function_oid, function_xmin
    FROM pg_catalog.pg_proc p WHERE p.oid = qualified::regprocedure;
END
$$;
