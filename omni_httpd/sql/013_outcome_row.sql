-- One outcome row (docs/performance.md, "One outcome row"): a handler or route function
-- now returns its outcome as omni_httpd._handler_outcome, its headers as the response's
-- own omni_http.http_header[] (the worker reads the binary array); no row, or a NULL
-- kind, is "no outcome". Before, it returned omni_httpd._handler_result, with the header
-- names and values split into two arrays by two subqueries: every request paid the
-- executor start-up of those. A route function now runs no statement of its own at
-- all: the worker passes the request's headers as one omni_http.http_header[]
-- parameter, so building the request is a simple expression, and so is the flattening.
-- A handler function keeps its one RETURN QUERY (the handler query and the flattening in
-- one statement), which copies a large body the fewest times. PostgreSQL instructions
-- per call (bench/pg_instructions.py): W1 handler 450k -> 399k, route 512k -> 384k; a
-- 256 KiB body (W3) 3.61M -> 3.56M.
--
-- The functions are otherwise those of 012_pipelining.sql and 009_routes.sql.

CREATE TYPE omni_httpd._handler_outcome AS (
    kind text,                        -- 'response' | 'abort' | 'proxy'; NULL: no outcome
    status int,                       -- response: the status, 200 when the handler gave NULL
    headers omni_http.http_header[],  -- response: the headers, in order
    body bytea,                       -- response: the body (NULL: no body)
    proxy_url text,                   -- proxy: where to forward the request
    preserve_host boolean             -- proxy: keep the incoming Host header
);
GRANT USAGE ON TYPE omni_httpd._handler_outcome TO PUBLIC;

-- The columns of omni_httpd._handler_outcome for the omni_httpd.http_outcome held in
-- `variable` (SQL text): one text for handler functions (as a select list), route
-- functions and omni_httpd._outcome_row (as a row, _flatten_expression). Only the
-- kind's fields are meaningful to the worker; a response without headers has an empty
-- array.
CREATE FUNCTION omni_httpd._flatten_columns(variable text)
    RETURNS text
    LANGUAGE sql IMMUTABLE
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT pg_catalog.format($flat$
    CASE WHEN (%1$s).abort THEN 'abort'
         WHEN ((%1$s).proxy).url IS NOT NULL THEN 'proxy'
         WHEN pg_catalog.num_nonnulls((%1$s).response) OPERATOR(pg_catalog.>) 0 THEN 'response' END,
    CASE WHEN pg_catalog.num_nonnulls((%1$s).response) OPERATOR(pg_catalog.>) 0
         THEN coalesce(((%1$s).response).status, 200)::pg_catalog.int4 END,
    CASE WHEN pg_catalog.num_nonnulls((%1$s).response) OPERATOR(pg_catalog.>) 0
         THEN coalesce(((%1$s).response).headers, '{}'::omni_http.http_header[]) END,
    ((%1$s).response).body,
    ((%1$s).proxy).url,
    CASE WHEN ((%1$s).proxy).url IS NOT NULL THEN coalesce(((%1$s).proxy).preserve_host, true) END
$flat$, $1)
$$;

CREATE FUNCTION omni_httpd._flatten_expression(variable text)
    RETURNS text
    LANGUAGE sql IMMUTABLE
    SET search_path = pg_catalog, pg_temp
AS $$ SELECT 'ROW(' || omni_httpd._flatten_columns($1) || ')::omni_httpd._handler_outcome' $$;

-- What a non-atomic procedure left in its OUT parameter, flattened the same way (the
-- worker reads it in a statement of its own). Replaces omni_httpd._flatten_outcome.
DROP FUNCTION omni_httpd._flatten_outcome(omni_httpd.http_outcome);
DO $do$
BEGIN
    EXECUTE pg_catalog.format(
        'CREATE FUNCTION omni_httpd._outcome_row(outcome omni_httpd.http_outcome) '
        'RETURNS omni_httpd._handler_outcome LANGUAGE sql IMMUTABLE '
        'SET search_path = pg_catalog, pg_temp AS %L',
        'SELECT ' || omni_httpd._flatten_expression('$1'));
END
$do$;
-- A non-atomic procedure's request is built in its CALL from the same parameters.
DROP FUNCTION omni_httpd._route_request(omni_http.http_method, text, text, bytea, text[], text[]);

-- Creating a handler or route function in the worker's session (the one way both
-- installers do it): SECURITY DEFINER, owned by `owner` (which the caller must be able
-- to become; PostgreSQL checks), executable only by the caller, with the handler search
-- path pinned (SET search_path FROM CURRENT takes the value set just before, without
-- writing it into the statement). A function of that name is replaced, never reused:
-- DROP, not CREATE OR REPLACE, which would keep its owner and privileges. Returns the
-- function's oid and row version (checked before every call).
CREATE FUNCTION omni_httpd._create_session_function(qualified text, returns text, body text, owner name,
                                                    OUT function_oid oid, OUT function_xmin xid)
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    installer name := current_user;
BEGIN
    EXECUTE pg_catalog.format('DROP FUNCTION IF EXISTS %s', $1);
    PERFORM pg_catalog.set_config('search_path', omni_httpd._handler_search_path(), true);
    EXECUTE pg_catalog.format(
        'CREATE FUNCTION %s RETURNS %s LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS %L',
        $1, $2, $3);
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', $1);
    IF $4 OPERATOR(pg_catalog.<>) installer THEN
        EXECUTE pg_catalog.format('ALTER FUNCTION %s OWNER TO %I', $1, $4);
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO %I', $1, installer);
    END IF;
    SELECT p.oid, p.xmin INTO function_oid, function_xmin
    FROM pg_catalog.pg_proc p WHERE p.oid OPERATOR(pg_catalog.=) $1::pg_catalog.regprocedure;
END
$$;

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

    -- Parameters are unnamed and there are no OUT parameters or variables, so that no
    -- PL/pgSQL variable can be mistaken for a column of the handler (use_column covers
    -- FOUND). One statement runs the handler and flattens its outcome: the LIMIT keeps
    -- the planner from pulling the outcome's computation up into each column. (Selecting
    -- the outcome INTO a variable and flattening it in a simple expression costs fewer
    -- instructions for a small answer, but copies a large body twice more: 256 KiB cost
    -- 3.6M -> 5.1M instructions.) No row, or a NULL kind, is "no outcome".
    function_body := pg_catalog.format(
$body$
#variable_conflict use_column
BEGIN
RETURN QUERY
%s,
omni_httpd_outcome AS (SELECT %s AS o %s LIMIT 1)
SELECT %s FROM omni_httpd_outcome AS s;
PERFORM omni_httpd._after_request();
EXCEPTION WHEN OTHERS OR query_canceled OR assert_failure THEN
    PERFORM omni_httpd._after_request();
    RAISE;
END
$body$,
        pg_catalog.rtrim(wrapping.wrapped, E'\n'),
        outcome,
        CASE WHEN wrapping.returns_rows THEN 'FROM omni_httpd_handler' ELSE '' END,
        omni_httpd._flatten_columns('s.o'));

    SELECT f.function_oid, f.function_xmin INTO function_oid, function_xmin
    FROM omni_httpd._create_session_function(qualified, 'SETOF omni_httpd._handler_outcome',
                                             function_body, new_owner) f;
END
$$;

CREATE OR REPLACE FUNCTION omni_httpd._install_route(fname text, handler regprocedure, router regclass,
                                          OUT function_oid oid, OUT function_xmin xid,
                                          OUT kind text, OUT role_name name,
                                          OUT call_statement text)
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    signature record;
    router_owner name;
    row_type text;
    target text;
    call_arguments text;
    invocation text;
    declarations text;
    function_body text;
    qualified text := pg_catalog.format(
        'pg_temp.%I(pg_catalog.int4, omni_http.http_method, pg_catalog.text, pg_catalog.text, '
        'pg_catalog.bytea, omni_http.http_header[], pg_catalog.text[], pg_catalog.text, '
        'pg_catalog.text, pg_catalog.int4, pg_catalog.text[], pg_catalog.text[], pg_catalog.bytea, '
        'pg_catalog.text, pg_catalog.bool)', $1);
BEGIN
    signature := omni_httpd._route_signature($2, $3);
    IF signature.problem IS NOT NULL THEN
        RAISE EXCEPTION '%', signature.problem;
    END IF;
    kind := signature.kind;
    role_name := omni_httpd._route_role($2);
    IF role_name IS NULL THEN
        RAISE EXCEPTION 'the role omni_httpd.handler_role assigns to % no longer exists', $2;
    END IF;
    SELECT o.rolname, c.reltype::pg_catalog.regtype::pg_catalog.text INTO router_owner, row_type
    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_roles o ON o.oid OPERATOR(pg_catalog.=) c.relowner
    WHERE c.oid OPERATOR(pg_catalog.=) $3::pg_catalog.oid;
    IF NOT (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) router_owner)
       AND NOT pg_catalog.pg_has_role(router_owner, role_name,
                                      CASE WHEN pg_catalog.current_setting('server_version_num')::int >= 160000
                                           THEN 'SET' ELSE 'MEMBER' END) THEN
        RAISE EXCEPTION '% would run as role %, which the owner of router % (%) cannot become',
            $2, role_name, $3, router_owner
            USING HINT = 'Route to functions of the router owner''s roles, or set omni_httpd.handler_role.';
    END IF;
    IF NOT pg_catalog.has_function_privilege(role_name, $2::pg_catalog.oid, 'EXECUTE') THEN
        RAISE EXCEPTION 'role % may not execute %', role_name, $2;
    END IF;
    IF signature.is_procedure AND omni_httpd._controls_transactions($2)
       AND omni_httpd._login_role_is_unprivileged() THEN
        -- Nothing to gain by RESET ROLE: run it non-atomic, as a top-level CALL (the
        -- worker sets the role around it). See docs/sql-api.md, "Procedures".
        kind := 'nonatomic';
        SELECT pg_catalog.format('CALL %I.%I(%s)', n.nspname, p.proname,
                   pg_catalog.string_agg(CASE a.what
                       WHEN 'listener' THEN '$1::pg_catalog.int4'
                       WHEN 'request' THEN 'ROW($2, $3, $4, $5, $6)::omni_httpd.http_request'
                       WHEN 'route' THEN pg_catalog.format('$8::pg_catalog.text::%s',
                                                           (SELECT c.reltype::pg_catalog.regtype::pg_catalog.text
                                                            FROM pg_catalog.pg_class c
                                                            WHERE c.oid OPERATOR(pg_catalog.=) $3::pg_catalog.oid))
                       WHEN 'outcome' THEN 'omni_httpd._route_outcome($9, $10, $11, $12, $13, $14, $15)'
                       ELSE 'NULL::omni_httpd.http_outcome' END, ', ' ORDER BY a.position))
        INTO call_statement
        FROM pg_catalog.pg_proc p
        JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) p.pronamespace
        CROSS JOIN pg_catalog.unnest(signature.arguments) WITH ORDINALITY AS a (what, position)
        WHERE p.oid OPERATOR(pg_catalog.=) $2::pg_catalog.oid
        GROUP BY n.nspname, p.proname;
        IF call_statement IS NULL THEN
            call_statement := pg_catalog.format('CALL %s()', $2::pg_catalog.oid::pg_catalog.regproc);
        END IF;
        RETURN;
    END IF;
    IF signature.is_procedure AND omni_httpd._controls_transactions($2) THEN
        RAISE EXCEPTION 'procedure % controls transactions (COMMIT/ROLLBACK), which PostgreSQL does not '
                        'allow inside the SECURITY DEFINER function that confines it to role %', $2, role_name
            USING HINT = 'Remove the transaction control, or see docs/sql-api.md, "Procedures".';
    END IF;

    SELECT pg_catalog.format('%I.%I', n.nspname, p.proname) INTO target
    FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) p.pronamespace
    WHERE p.oid OPERATOR(pg_catalog.=) $2::pg_catalog.oid;
    SELECT coalesce(pg_catalog.string_agg(CASE a.what WHEN 'listener' THEN '$1'
                                                      WHEN 'request' THEN 'request'
                                                      WHEN 'route' THEN 'route'
                                                      ELSE 'outcome' END,
                                          ', ' ORDER BY a.position), '')
    INTO call_arguments
    FROM pg_catalog.unnest(signature.arguments) WITH ORDINALITY AS a (what, position)
    -- A function's OUT parameter is its result; a procedure's is passed a variable.
    WHERE a.what <> 'out' OR signature.is_procedure;
    IF signature.is_procedure THEN
        invocation := pg_catalog.format('CALL %s(%s);', target, call_arguments);
    ELSE
        invocation := pg_catalog.format('outcome := %s(%s);', target, call_arguments);
    END IF;

    -- Only what the handler takes is built (each costs every request); only middleware
    -- get the outcome so far.
    declarations := CASE WHEN 'request' = ANY (signature.arguments) THEN
$decl$request omni_httpd.http_request := ROW($2, $3, $4, $5, $6)::omni_httpd.http_request;
$decl$ ELSE '' END
        || CASE WHEN 'route' = ANY (signature.arguments)
                THEN pg_catalog.format(E'route %1$s := $8::%1$s;\n', row_type) ELSE '' END;
    IF kind = 'middleware' THEN
        invocation := $outcome$IF $9 IS NOT NULL THEN
    outcome := CASE $9
        WHEN 'abort' THEN ROW(NULL, true, NULL)::omni_httpd.http_outcome
        WHEN 'proxy' THEN ROW(NULL, NULL, ROW($14, $15)::omni_httpd.http_proxy)::omni_httpd.http_outcome
        ELSE ROW(ROW($13, $10::pg_catalog.int2,
                     ARRAY(SELECT ROW(h.name, h.value)::omni_http.http_header
                           FROM ROWS FROM (pg_catalog.unnest($11), pg_catalog.unnest($12)) AS h(name, value))
                     )::omni_httpd.http_response, NULL, NULL)::omni_httpd.http_outcome END;
END IF;
$outcome$ || invocation;
    END IF;

    function_body := pg_catalog.format(
$body$
DECLARE
%1$soutcome omni_httpd.http_outcome;
BEGIN
%2$s
PERFORM omni_httpd._after_request();
RETURN %3$s;
EXCEPTION WHEN OTHERS OR query_canceled OR assert_failure THEN
    -- A failed route cleans up too, before its error goes on unchanged: the worker may
    -- already have sent the next request behind it (pipelining, sql/012_pipelining.sql).
    PERFORM omni_httpd._after_request();
    RAISE;
END
$body$, declarations, invocation, omni_httpd._flatten_expression('outcome'));

    SELECT f.function_oid, f.function_xmin INTO function_oid, function_xmin
    FROM omni_httpd._create_session_function(qualified, 'omni_httpd._handler_outcome',
                                             function_body, role_name) f;
END
$$;

GRANT EXECUTE ON FUNCTION omni_httpd._flatten_columns(text), omni_httpd._flatten_expression(text),
    omni_httpd._create_session_function(text, text, text, name),
    omni_httpd._outcome_row(omni_httpd.http_outcome) TO PUBLIC;
