-- Schema omni_httpd, part 6: confinement of handlers (docs/sql-api.md, "Security model").
--
-- What a handler's role must not reach: the daemon's privileges (through a hidden second
-- statement, a hijacked name in the runtime's own code, or a handler function it
-- changed), and later requests (through settings, temporary objects, session advisory
-- locks, prepared statements, cursors, LISTENs and sequence caches left in the worker's
-- session). Released migrations are never edited, so the fixes are here.

-- 1. The SQL lexer, agreeing with PostgreSQL's scanner on everything that can hide a `;`
-- or a parenthesis: `--` comments end at LF *or CR*; '...' strings take backslash escapes
-- only when standard_conforming_strings is off; E'...' always do; U&'...', B'...' and
-- X'...' never do; U&"..." is a quoted identifier; $tag$ dollar quotes; nested /* */
-- comments; numbers end where PostgreSQL's end (so `1e'...'` is the number 1 followed by
-- an E'' string, as in PostgreSQL 13 and 14; 15 and later refuse it).
--   kind:  'word' (identifier or keyword, lower-cased), 'ident' ("quoted"), 'string',
--          'number', 'param' ($1), 'punct' (any other single character)
--   pos:   1-based byte offset of the token in convert_to(query, 'UTF8')
--   depth: parenthesis depth outside the token
-- Bytes >= 128 are identifier characters, as in PostgreSQL's own lexer.
CREATE FUNCTION omni_httpd._sql_tokens(query text, standard_conforming_strings boolean)
    RETURNS TABLE (kind text, token text, pos int, depth int)
    LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    src bytea := pg_catalog.convert_to($1, 'UTF8');
    n int := pg_catalog.length(src);
    i int := 0;          -- 0-based byte index
    start int;
    c int;
    d int;
    e int;
    level int := 0;
    nesting int;
    tag bytea;
    found_at int;
    token_kind text;
    escapes boolean;
BEGIN
    WHILE i < n LOOP
        c := pg_catalog.get_byte(src, i);
        IF c IN (32, 9, 10, 11, 12, 13) THEN          -- white space
            i := i + 1;
            CONTINUE;
        END IF;
        d := CASE WHEN i + 1 < n THEN pg_catalog.get_byte(src, i + 1) ELSE -1 END;
        e := CASE WHEN i + 2 < n THEN pg_catalog.get_byte(src, i + 2) ELSE -1 END;
        start := i;
        IF c = 45 AND d = 45 THEN                     -- -- comment, to the end of the line
            WHILE i < n AND pg_catalog.get_byte(src, i) NOT IN (10, 13) LOOP
                i := i + 1;
            END LOOP;
            CONTINUE;
        ELSIF c = 47 AND d = 42 THEN                  -- /* comment */, nested
            nesting := 1;
            i := i + 2;
            WHILE i < n AND nesting > 0 LOOP
                c := pg_catalog.get_byte(src, i);
                d := CASE WHEN i + 1 < n THEN pg_catalog.get_byte(src, i + 1) ELSE -1 END;
                IF c = 47 AND d = 42 THEN
                    nesting := nesting + 1;
                    i := i + 2;
                ELSIF c = 42 AND d = 47 THEN
                    nesting := nesting - 1;
                    i := i + 2;
                ELSE
                    i := i + 1;
                END IF;
            END LOOP;
            CONTINUE;
        ELSIF c = 39 OR (c IN (69, 101, 66, 98, 88, 120) AND d = 39)
              OR (c IN (85, 117) AND d = 38 AND e = 39) THEN
            -- '...', E'...', B'...', X'...', U&'...'
            IF c = 39 THEN
                escapes := NOT $2;
                i := i + 1;
            ELSIF c IN (85, 117) THEN
                escapes := false;
                i := i + 3;
            ELSE
                escapes := c IN (69, 101);
                i := i + 2;
            END IF;
            WHILE i < n LOOP
                d := pg_catalog.get_byte(src, i);
                IF d = 92 AND escapes THEN            -- backslash escape
                    i := i + 2;
                ELSIF d = 39 THEN
                    IF i + 1 < n AND pg_catalog.get_byte(src, i + 1) = 39 THEN
                        i := i + 2;                   -- '' inside the string
                    ELSE
                        i := i + 1;
                        EXIT;
                    END IF;
                ELSE
                    i := i + 1;
                END IF;
            END LOOP;
            token_kind := 'string';
        ELSIF c = 34 OR (c IN (85, 117) AND d = 38 AND e = 34) THEN   -- "ident", U&"ident"
            i := i + CASE WHEN c = 34 THEN 1 ELSE 3 END;
            WHILE i < n LOOP
                IF pg_catalog.get_byte(src, i) = 34 THEN
                    IF i + 1 < n AND pg_catalog.get_byte(src, i + 1) = 34 THEN
                        i := i + 2;
                    ELSE
                        i := i + 1;
                        EXIT;
                    END IF;
                ELSE
                    i := i + 1;
                END IF;
            END LOOP;
            token_kind := 'ident';
        ELSIF c = 36 AND d BETWEEN 48 AND 57 THEN     -- $1
            i := i + 1;
            WHILE i < n AND pg_catalog.get_byte(src, i) BETWEEN 48 AND 57 LOOP
                i := i + 1;
            END LOOP;
            token_kind := 'param';
        ELSIF c = 36 THEN                             -- $tag$ ... $tag$, or a lone $
            i := i + 1;
            WHILE i < n LOOP
                d := pg_catalog.get_byte(src, i);
                EXIT WHEN NOT (d BETWEEN 65 AND 90 OR d BETWEEN 97 AND 122 OR d = 95
                               OR d >= 128 OR d BETWEEN 48 AND 57);
                i := i + 1;
            END LOOP;
            IF i < n AND pg_catalog.get_byte(src, i) = 36 THEN
                tag := substring(src FROM start + 1 FOR i - start + 1);
                found_at := position(tag IN substring(src FROM i + 2));
                IF found_at = 0 THEN
                    i := n;                           -- unterminated: the rest
                ELSE
                    i := i + 1 + found_at - 1 + pg_catalog.length(tag);
                END IF;
                token_kind := 'string';
            ELSE
                i := start + 1;
                token_kind := 'punct';
            END IF;
        ELSIF c BETWEEN 65 AND 90 OR c BETWEEN 97 AND 122 OR c = 95 OR c >= 128 THEN
            i := i + 1;                               -- identifier or keyword
            WHILE i < n LOOP
                d := pg_catalog.get_byte(src, i);
                EXIT WHEN NOT (d BETWEEN 65 AND 90 OR d BETWEEN 97 AND 122 OR d = 95
                               OR d >= 128 OR d BETWEEN 48 AND 57 OR d = 36);
                i := i + 1;
            END LOOP;
            token_kind := 'word';
        ELSIF c BETWEEN 48 AND 57 OR (c = 46 AND d BETWEEN 48 AND 57) THEN
            -- digits [. digits] [e [+-] digits], as PostgreSQL reads a number; what
            -- follows (letters, a quote) starts the next token.
            WHILE i < n AND pg_catalog.get_byte(src, i) BETWEEN 48 AND 57 LOOP
                i := i + 1;
            END LOOP;
            IF i < n AND pg_catalog.get_byte(src, i) = 46
               AND NOT (i + 1 < n AND pg_catalog.get_byte(src, i + 1) = 46) THEN
                i := i + 1;
                WHILE i < n AND pg_catalog.get_byte(src, i) BETWEEN 48 AND 57 LOOP
                    i := i + 1;
                END LOOP;
            END IF;
            IF i < n AND pg_catalog.get_byte(src, i) IN (69, 101) THEN
                d := CASE WHEN i + 1 < n THEN pg_catalog.get_byte(src, i + 1) ELSE -1 END;
                e := CASE WHEN i + 2 < n THEN pg_catalog.get_byte(src, i + 2) ELSE -1 END;
                IF d BETWEEN 48 AND 57 THEN
                    i := i + 1;
                ELSIF d IN (43, 45) AND e BETWEEN 48 AND 57 THEN
                    i := i + 2;
                END IF;
                IF i > start AND pg_catalog.get_byte(src, i - 1) BETWEEN 48 AND 57 THEN
                    WHILE i < n AND pg_catalog.get_byte(src, i) BETWEEN 48 AND 57 LOOP
                        i := i + 1;
                    END LOOP;
                END IF;
            END IF;
            token_kind := 'number';
        ELSE
            i := i + 1;
            token_kind := 'punct';
        END IF;

        kind := token_kind;
        token := pg_catalog.convert_from(substring(src FROM start + 1 FOR i - start), 'UTF8');
        pos := start + 1;
        IF token_kind = 'word' THEN
            token := pg_catalog.lower(token);
        ELSIF token_kind = 'punct' AND token = ')' THEN
            level := GREATEST(level - 1, 0);
        END IF;
        depth := level;
        RETURN NEXT;
        IF token_kind = 'punct' AND token = '(' THEN
            level := level + 1;
        END IF;
    END LOOP;
END
$$;

-- The handler runtime reads queries as the worker's session does:
-- standard_conforming_strings on (the worker pins it when it connects).
CREATE OR REPLACE FUNCTION omni_httpd._sql_tokens(query text)
    RETURNS TABLE (kind text, token text, pos int, depth int)
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
AS $$ SELECT * FROM omni_httpd._sql_tokens($1, true) $$;

CREATE FUNCTION omni_httpd._split_statements(query text, standard_conforming_strings boolean)
    RETURNS text[]
    LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    src bytea := pg_catalog.convert_to($1, 'UTF8');
    segment_start int := 1;
    has_tokens boolean := false;
    statements text[] := ARRAY[]::text[];
    t record;
BEGIN
    FOR t IN SELECT * FROM omni_httpd._sql_tokens($1, $2) LOOP
        IF t.kind = 'punct' AND t.token = ';' THEN
            IF has_tokens THEN
                statements := statements
                    || pg_catalog.convert_from(substring(src FROM segment_start FOR t.pos - segment_start), 'UTF8');
            END IF;
            segment_start := t.pos + 1;
            has_tokens := false;
        ELSE
            has_tokens := true;
        END IF;
    END LOOP;
    IF has_tokens THEN
        statements := statements || pg_catalog.convert_from(substring(src FROM segment_start), 'UTF8');
    END IF;
    RETURN statements;
END
$$;

CREATE OR REPLACE FUNCTION omni_httpd._split_statements(query text)
    RETURNS text[]
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
AS $$ SELECT omni_httpd._split_statements($1, true) $$;

-- 2. Every function of the runtime and the API resolves names in pg_catalog (then
-- pg_temp, last, for relations and types): a role's own `unnest` or `=` in a schema on
-- some search_path cannot stand in for the built-in ones. The SQL constructors
-- (http_header, http_request, abort, http_proxy, the outcome cast) name nothing
-- unqualified and stay inlinable, so they carry no SET clause.
ALTER FUNCTION omni_http.http_header_get(omni_http.http_header[], text) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION omni_http.http_header_get_all(omni_http.http_header[], text) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION omni_httpd.http_response(anycompatible, int, omni_http.http_header[]) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION omni_httpd._can_become(name) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION omni_httpd.reload_configuration() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION omni_httpd._configuration_changed() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION omni_httpd._listeners_updated() SET search_path = pg_catalog, pg_temp;
ALTER PROCEDURE omni_httpd.wait_for_configuration_reloads(int) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION omni_httpd._split_with(text) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION omni_httpd._wrap_handler_query(text, text, text) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION omni_httpd._cascading_query_add(text[], text, text) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION omni_httpd._cascading_query_build(text[]) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION omni_httpd._html_escape(text) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION omni_httpd.default_page(omni_httpd.http_request) SET search_path = pg_catalog, pg_temp;

-- The search_path a handler runs with: the session's default (what `SET search_path`
-- would RESET to) with pg_temp explicitly last, so a temporary table never shadows a
-- real one.
CREATE FUNCTION omni_httpd._handler_search_path()
    RETURNS text
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN s.reset_val = '' THEN 'pg_temp' ELSE s.reset_val || ', pg_temp' END
    FROM pg_catalog.pg_settings s WHERE s.name = 'search_path'
$$;

-- 3. Checking a handler query runs nothing of it. The one-statement check is the lexer's;
-- the parse/analysis is PostgreSQL's own validator of an SQL function whose body is the
-- wrapped query (created in a subtransaction that is rolled back): it parses and
-- analyses every statement but plans and executes none, and the text reaches it as a
-- quoted literal, so whatever the lexer might miss can never run here.
CREATE FUNCTION omni_httpd._validate_handler_query(query text)
    RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
    SET check_function_bodies = on
AS $$
DECLARE
    probe_request constant text :=
        'SELECT $1 AS method, $2 AS path, $3 AS query_string, $4 AS body, $5 AS headers';
    wrapping record;
    saved_path text := pg_catalog.current_setting('search_path');
BEGIN
    wrapping := omni_httpd._wrap_handler_query($1, probe_request, NULL);
    BEGIN
        PERFORM pg_catalog.set_config('search_path', omni_httpd._handler_search_path(), true);
        EXECUTE pg_catalog.format(
            'CREATE FUNCTION pg_temp.%I(omni_http.http_method, pg_catalog.text, pg_catalog.text, '
            'pg_catalog.bytea, omni_http.http_header[]) RETURNS SETOF pg_catalog.record '
            'LANGUAGE sql SET search_path FROM CURRENT AS %L',
            'omni_httpd_probe_' || pg_catalog.pg_backend_pid(),
            wrapping.wrapped || CASE WHEN wrapping.returns_rows
                                     THEN 'SELECT * FROM omni_httpd_handler' ELSE 'SELECT' END);
        RAISE EXCEPTION USING ERRCODE = 'OH001', MESSAGE = 'probe done';
    EXCEPTION
        WHEN SQLSTATE 'OH001' THEN
            NULL;
    END;
    PERFORM pg_catalog.set_config('search_path', saved_path, true);
END
$$;

CREATE OR REPLACE FUNCTION omni_httpd._check_handler_query()
    RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    current_query text;
    problem text;
BEGIN
    -- Check the row as it is now; if it was changed or deleted since this event, the
    -- later event (if any) checks the newer version.
    SELECT h.query INTO current_query FROM omni_httpd.handlers h
    WHERE h.id = NEW.id AND h.query = NEW.query;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF coalesce(pg_catalog.array_length(omni_httpd._split_statements(current_query, true), 1), 0) <> 1 THEN
        RAISE EXCEPTION 'query can only contain one statement' USING ERRCODE = 'check_violation';
    END IF;
    BEGIN
        PERFORM omni_httpd._validate_handler_query(current_query);
    EXCEPTION WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS problem = MESSAGE_TEXT;
        RAISE EXCEPTION 'invalid query' USING DETAIL = problem, ERRCODE = 'check_violation';
    END;
    RETURN NULL;
END
$$;

-- 4. The handler function. The worker learns the query's column types without running
-- anything (the protocol's Parse/Describe, which refuses more than one statement) and
-- passes them here. The function is created from a quoted body (one statement), owned
-- by role_name (SECURITY DEFINER: the handler runs as that role, which cannot change
-- role inside it), executable only by its owner and the installing user (the daemon),
-- with the handler search_path pinned, and it cleans the session up when the handler
-- has succeeded. Every name in the generated code is schema-qualified and it uses no
-- operator, so no object of any role changes what it does.
--
-- Because role_name owns it, role_name could change it (ALTER, CREATE OR REPLACE, DROP and
-- recreate): the worker calls it only through omni_httpd._before_request, which refuses
-- to go on unless the function is still exactly the one installed (same oid and row
-- version). Returns that oid and row version.
CREATE FUNCTION omni_httpd._install_handler(fname text, query text, role_name name,
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

-- The same for a session of your own (experiments, tests): the column types come from
-- _handler_columns run inside a temporary SECURITY DEFINER function owned by role_name,
-- so the analysis (and anything the query text could hide) has that role's rights only.
-- The daemon itself never uses this: it asks the protocol for the types.
CREATE OR REPLACE FUNCTION omni_httpd._install_handler(fname text, query text, role_name name)
    RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    probe text := 'omni_httpd_columns_' || pg_catalog.pg_backend_pid();
    owner_role name := coalesce($3, current_user);
    column_types regtype[];
BEGIN
    PERFORM pg_catalog.set_config('search_path', omni_httpd._handler_search_path(), true);
    EXECUTE pg_catalog.format(
        'CREATE FUNCTION pg_temp.%I() RETURNS pg_catalog.regtype[] LANGUAGE plpgsql SECURITY DEFINER '
        'SET search_path FROM CURRENT AS %L', probe,
        pg_catalog.format('BEGIN RETURN omni_httpd._handler_columns(%L); END', $2));
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION pg_temp.%I() FROM PUBLIC', probe);
    IF owner_role <> current_user THEN
        EXECUTE pg_catalog.format('ALTER FUNCTION pg_temp.%I() OWNER TO %I', probe, owner_role);
    END IF;
    BEGIN
        EXECUTE pg_catalog.format('SELECT pg_temp.%I()', probe) INTO column_types;
    EXCEPTION WHEN OTHERS THEN
        EXECUTE pg_catalog.format('DROP FUNCTION pg_temp.%I()', probe);
        RAISE;
    END;
    EXECUTE pg_catalog.format('DROP FUNCTION pg_temp.%I()', probe);
    PERFORM omni_httpd._install_handler($1, $2, $3, column_types);
END
$$;

-- 5. Before every request (evaluated as an argument of the handler call, so before the
-- function body runs; the call is written WITH ORDINALITY, which PostgreSQL never
-- inlines): the handler function must be exactly the one installed, and the session
-- must hold no temporary object but the worker's own handler functions (own_objects of
-- them). Otherwise SQLSTATE OH002 / OH003, nothing has run, and the worker resets the
-- session and runs the request again.
CREATE FUNCTION omni_httpd._before_request(method omni_http.http_method, handler_function oid,
                                           handler_xmin xid, own_objects int)
    RETURNS omni_http.http_method
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    intact boolean;
    temporary_objects bigint;
BEGIN
    -- One query for both checks (measured: each SPI query costs about a microsecond).
    SELECT EXISTS (SELECT FROM pg_catalog.pg_proc p WHERE p.oid = $2 AND p.xmin = $3),
           (SELECT pg_catalog.count(*) FROM pg_catalog.pg_depend d
            WHERE d.refclassid = 'pg_catalog.pg_namespace'::pg_catalog.regclass
              AND d.refobjid = pg_catalog.pg_my_temp_schema() AND d.refobjsubid = 0)
    INTO intact, temporary_objects;
    IF NOT intact THEN
        RAISE EXCEPTION USING ERRCODE = 'OH002',
            MESSAGE = 'the handler function was changed or dropped since it was installed';
    END IF;
    IF temporary_objects <> $4 THEN
        RAISE EXCEPTION USING ERRCODE = 'OH003',
            MESSAGE = 'a request left temporary objects in the session';
    END IF;
    RETURN $1;
END
$$;

-- 6. After every request (from the handler function when it succeeded; from the worker,
-- as a statement of its own, when it failed: a rolled-back transaction undoes settings,
-- LISTENs and temporary objects, but not session advisory locks, SQL prepared statements
-- or sequence caches): what a request could leave in the session is undone. RESET ALL
-- comes last, so the statements before it still run with this function's search_path;
-- the settings the worker chose at connect time survive it (they are the session's
-- defaults).
CREATE FUNCTION omni_httpd._after_request()
    RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    statement_name text;
    portal pg_catalog.refcursor;
BEGIN
    PERFORM pg_catalog.pg_advisory_unlock_all();
    UNLISTEN *;
    DISCARD SEQUENCES;
    -- Rare, so look first (cheaper than opening the loops).
    IF EXISTS (SELECT FROM pg_catalog.pg_prepared_statements p WHERE p.from_sql)
       OR EXISTS (SELECT FROM pg_catalog.pg_cursors c WHERE c.is_holdable) THEN
        FOR statement_name IN SELECT p.name FROM pg_catalog.pg_prepared_statements p WHERE p.from_sql LOOP
            EXECUTE pg_catalog.format('DEALLOCATE %I', statement_name);
        END LOOP;
        FOR portal IN SELECT c.name FROM pg_catalog.pg_cursors c WHERE c.is_holdable LOOP
            CLOSE portal;
        END LOOP;
    END IF;
    RESET ALL;
END
$$;

GRANT EXECUTE ON FUNCTION
    omni_httpd._sql_tokens(text, boolean), omni_httpd._split_statements(text, boolean),
    omni_httpd._handler_search_path(), omni_httpd._validate_handler_query(text),
    omni_httpd._install_handler(text, text, name, regtype[]),
    omni_httpd._before_request(omni_http.http_method, oid, xid, int),
    omni_httpd._after_request()
    TO PUBLIC;

-- 7. The welcome page of the first start runs as a role with no rights of its own
-- (omni_httpd_welcome, NOLOGIN), not as the daemon's login role, which on an embedded
-- cluster is the superuser. A daemon that is no superuser (a managed database) keeps
-- using its own role, which is then no more than what it is.
CREATE OR REPLACE FUNCTION omni_httpd._initialize_default(address inet, port int)
    RETURNS boolean
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    page_role name := current_user;
BEGIN
    INSERT INTO omni_httpd.default_initialization DEFAULT VALUES ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname = current_user) THEN
        BEGIN
            CREATE ROLE omni_httpd_welcome NOLOGIN;
        EXCEPTION WHEN duplicate_object THEN
            NULL;   -- another database of the cluster made it
        END;
        page_role := 'omni_httpd_welcome';
    END IF;
    WITH listener AS (
        INSERT INTO omni_httpd.listeners (address, port) VALUES ($1, $2) RETURNING id
    ), handler AS (
        INSERT INTO omni_httpd.handlers (query, role_name)
        VALUES ('SELECT omni_httpd.default_page(request.*::omni_httpd.http_request) FROM request', page_role)
        RETURNING id
    )
    INSERT INTO omni_httpd.listeners_handlers (listener_id, handler_id)
    SELECT listener.id, handler.id FROM listener, handler;
    RETURN true;
END
$$;
