-- Schema omni_httpd, part 3: handler queries as text. A small SQL lexer (enough to find
-- statement boundaries and the parts of a WITH clause), the wrapping that puts the
-- `request` relation in scope, the validity check of omni_httpd.handlers, and the
-- cascading_query aggregate.

-- The tokens of `query`, comments and white space left out. The lexer knows what can
-- hide a `;` or a parenthesis: '...' strings ('' escapes), E'...' strings (backslash
-- escapes as well), "..." identifiers, $tag$...$tag$ dollar quotes, -- comments and
-- nested /* */ comments. (It assumes standard_conforming_strings, the default since
-- PostgreSQL 9.1.)
--   kind:  'word' (identifier or keyword, lower-cased), 'ident' ("quoted"), 'string',
--          'number', 'param' ($1), 'punct' (any other single character)
--   pos:   1-based byte offset of the token in convert_to(query, 'UTF8')
--   depth: parenthesis depth outside the token (both parentheses of a pair get the
--          depth of what surrounds them)
-- It works on bytes (get_byte is O(1)); every character that matters is ASCII, and bytes
-- of multi-byte characters are identifier characters, as in PostgreSQL's own lexer.
CREATE FUNCTION omni_httpd._sql_tokens(query text)
    RETURNS TABLE (kind text, token text, pos int, depth int)
    LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
AS $$
DECLARE
    src bytea := convert_to($1, 'UTF8');
    n int := length(src);
    i int := 0;          -- 0-based byte index
    start int;
    c int;
    d int;
    level int := 0;
    nesting int;
    tag bytea;
    found_at int;
    token_kind text;
BEGIN
    WHILE i < n LOOP
        c := get_byte(src, i);
        IF c IN (32, 9, 10, 11, 12, 13) THEN          -- white space
            i := i + 1;
            CONTINUE;
        END IF;
        d := CASE WHEN i + 1 < n THEN get_byte(src, i + 1) ELSE -1 END;
        start := i;
        IF c = 45 AND d = 45 THEN                     -- -- comment, to the end of the line
            WHILE i < n AND get_byte(src, i) <> 10 LOOP
                i := i + 1;
            END LOOP;
            CONTINUE;
        ELSIF c = 47 AND d = 42 THEN                  -- /* comment */, nested
            nesting := 1;
            i := i + 2;
            WHILE i < n AND nesting > 0 LOOP
                c := get_byte(src, i);
                d := CASE WHEN i + 1 < n THEN get_byte(src, i + 1) ELSE -1 END;
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
        ELSIF c = 39 OR (c IN (69, 101) AND d = 39) THEN   -- '...' or E'...'
            IF c = 39 THEN
                i := i + 1;
            ELSE
                i := i + 2;
            END IF;
            WHILE i < n LOOP
                d := get_byte(src, i);
                IF d = 92 AND c <> 39 THEN            -- backslash escape in E'...'
                    i := i + 2;
                ELSIF d = 39 THEN
                    IF i + 1 < n AND get_byte(src, i + 1) = 39 THEN
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
        ELSIF c = 34 THEN                             -- "quoted identifier"
            i := i + 1;
            WHILE i < n LOOP
                IF get_byte(src, i) = 34 THEN
                    IF i + 1 < n AND get_byte(src, i + 1) = 34 THEN
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
            WHILE i < n AND get_byte(src, i) BETWEEN 48 AND 57 LOOP
                i := i + 1;
            END LOOP;
            token_kind := 'param';
        ELSIF c = 36 THEN                             -- $tag$ ... $tag$, or a lone $
            i := i + 1;
            WHILE i < n LOOP
                d := get_byte(src, i);
                EXIT WHEN NOT (d BETWEEN 65 AND 90 OR d BETWEEN 97 AND 122 OR d = 95
                               OR d >= 128 OR d BETWEEN 48 AND 57);
                i := i + 1;
            END LOOP;
            IF i < n AND get_byte(src, i) = 36 THEN
                tag := substring(src FROM start + 1 FOR i - start + 1);
                found_at := position(tag IN substring(src FROM i + 2));
                IF found_at = 0 THEN
                    i := n;                           -- unterminated: the rest
                ELSE
                    i := i + 1 + found_at - 1 + length(tag);
                END IF;
                token_kind := 'string';
            ELSE
                i := start + 1;
                token_kind := 'punct';
            END IF;
        ELSIF c BETWEEN 65 AND 90 OR c BETWEEN 97 AND 122 OR c = 95 OR c >= 128 THEN
            i := i + 1;                               -- identifier or keyword
            WHILE i < n LOOP
                d := get_byte(src, i);
                EXIT WHEN NOT (d BETWEEN 65 AND 90 OR d BETWEEN 97 AND 122 OR d = 95
                               OR d >= 128 OR d BETWEEN 48 AND 57 OR d = 36);
                i := i + 1;
            END LOOP;
            token_kind := 'word';
        ELSIF c BETWEEN 48 AND 57 OR (c = 46 AND d BETWEEN 48 AND 57) THEN
            i := i + 1;                               -- number (roughly; enough here)
            WHILE i < n LOOP
                d := get_byte(src, i);
                EXIT WHEN NOT (d BETWEEN 48 AND 57 OR d BETWEEN 65 AND 90
                               OR d BETWEEN 97 AND 122 OR d = 95 OR d = 46);
                i := i + 1;
            END LOOP;
            token_kind := 'number';
        ELSE
            i := i + 1;
            token_kind := 'punct';
        END IF;

        kind := token_kind;
        token := convert_from(substring(src FROM start + 1 FOR i - start), 'UTF8');
        pos := start + 1;
        IF token_kind = 'word' THEN
            token := lower(token);
        ELSIF token_kind = 'punct' AND token = ')' THEN
            level := greatest(level - 1, 0);
        END IF;
        depth := level;
        RETURN NEXT;
        IF token_kind = 'punct' AND token = '(' THEN
            level := level + 1;
        END IF;
    END LOOP;
END
$$;

-- The statements of `query`: the text between top-level semicolons (comments kept,
-- the semicolons dropped), leaving out those with nothing but white space and comments.
CREATE FUNCTION omni_httpd._split_statements(query text)
    RETURNS text[]
    LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
AS $$
DECLARE
    src bytea := convert_to($1, 'UTF8');
    segment_start int := 1;
    has_tokens boolean := false;
    statements text[] := ARRAY[]::text[];
    t record;
BEGIN
    FOR t IN SELECT * FROM omni_httpd._sql_tokens($1) LOOP
        IF t.kind = 'punct' AND t.token = ';' THEN
            IF has_tokens THEN
                statements := statements
                    || convert_from(substring(src FROM segment_start FOR t.pos - segment_start), 'UTF8');
            END IF;
            segment_start := t.pos + 1;
            has_tokens := false;
        ELSE
            has_tokens := true;
        END IF;
    END LOOP;
    IF has_tokens THEN
        statements := statements || convert_from(substring(src FROM segment_start), 'UTF8');
    END IF;
    RETURN statements;
END
$$;

-- Split one statement that starts with WITH into its CTE list and its main statement,
-- so that a handler's own WITH clause (possibly holding INSERT/UPDATE/DELETE, which
-- PostgreSQL allows only in a top-level WITH) can be merged into the wrapper's WITH.
-- For any other statement: ctes is NULL and main is the statement.
--
-- The main statement is the first token at parenthesis depth 0 after WITH that is
--   * SELECT/INSERT/UPDATE/DELETE/VALUES/TABLE/MERGE not in the place of a CTE name or
--     of a column of a SEARCH/CYCLE clause, or
--   * an opening parenthesis that follows a closing one (`WITH a AS (...) (SELECT ...)`)
--     or the last column name of a SEARCH/CYCLE clause.
CREATE FUNCTION omni_httpd._split_with(
    statement text, OUT is_recursive boolean, OUT ctes text, OUT main text)
    LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
AS $$
DECLARE
    src bytea := convert_to($1, 'UTF8');
    t record;
    k int := 0;              -- depth-0 tokens seen
    cte_start int;
    main_start int;
    prev text;
    prev2 text;
    word text;
BEGIN
    is_recursive := false;
    FOR t IN SELECT * FROM omni_httpd._sql_tokens($1) WHERE depth = 0 LOOP
        k := k + 1;
        word := CASE WHEN t.kind = 'word' OR t.kind = 'punct' THEN t.token END;
        IF k = 1 THEN
            EXIT WHEN word IS DISTINCT FROM 'with';
        ELSIF k = 2 AND word = 'recursive' THEN
            is_recursive := true;
        ELSE
            IF cte_start IS NULL THEN
                cte_start := t.pos;
            END IF;
            IF (word IN ('select', 'insert', 'update', 'delete', 'values', 'table', 'merge')
                    AND prev IS DISTINCT FROM ','
                    AND prev NOT IN ('with', 'recursive', 'by', 'set', 'using', 'cycle', 'to', 'default'))
               OR (word = '(' AND (prev = ')'
                    OR (prev IS NOT NULL AND prev NOT IN ('as', 'materialized', ',', '(')
                        AND prev2 IN ('set', 'using')))) THEN
                main_start := t.pos;
                EXIT;
            END IF;
        END IF;
        prev2 := prev;
        prev := coalesce(word, t.token);
    END LOOP;
    IF main_start IS NULL THEN
        is_recursive := false;
        main := $1;
        RETURN;
    END IF;
    ctes := convert_from(substring(src FROM cte_start FOR main_start - cte_start), 'UTF8');
    main := convert_from(substring(src FROM main_start), 'UTF8');
END
$$;

-- The handler query wrapped so that `request` is in scope:
--   WITH request AS (<request_select>), [<the handler's own CTEs>,]
--        omni_httpd_handler[(<aliases>)] AS (<the handler's main statement>)
-- The caller appends the final SELECT (which reads omni_httpd_handler). A trailing
-- semicolon is dropped; newlines keep a trailing `-- comment` from swallowing the
-- wrapper's closing parenthesis. A handler whose main statement is INSERT/UPDATE/DELETE
-- without RETURNING has no columns: `returns_rows` is false and omni_httpd_handler must
-- not be read (PostgreSQL still runs it: a data-modifying CTE always runs).
CREATE FUNCTION omni_httpd._wrap_handler_query(
    query text, request_select text, aliases text,
    OUT wrapped text, OUT returns_rows boolean)
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
DECLARE
    statements text[] := omni_httpd._split_statements(query);
    parts record;
    first_word text;
BEGIN
    IF coalesce(array_length(statements, 1), 0) <> 1 THEN
        RAISE EXCEPTION 'query can only contain one statement' USING ERRCODE = 'syntax_error';
    END IF;
    parts := omni_httpd._split_with(statements[1]);
    SELECT t.token INTO first_word FROM omni_httpd._sql_tokens(parts.main) t ORDER BY t.pos LIMIT 1;
    returns_rows := NOT (first_word IN ('insert', 'update', 'delete', 'merge')
                         AND NOT EXISTS (SELECT FROM omni_httpd._sql_tokens(parts.main) t
                                         WHERE t.depth = 0 AND t.kind = 'word'
                                           AND t.token = 'returning'));
    wrapped := 'WITH ' || CASE WHEN parts.is_recursive THEN 'RECURSIVE ' ELSE '' END
        || 'request AS (' || request_select || E'),\n'
        || coalesce(parts.ctes || E'\n,\n', '')
        || 'omni_httpd_handler' || coalesce('(' || aliases || ')', '') || E' AS (\n'
        || parts.main || E'\n)\n';
END
$$;

-- The column types of what `query` returns with `request` in scope, found without
-- running it: CREATE TABLE AS ... WITH NO DATA analyses the query (data-modifying ones
-- included) but executes nothing; the probe table is made in a subtransaction that is
-- then rolled back. Duplicate column names (which a table cannot have)
-- are handled by renaming the first k columns c1..ck, k growing until it works.
-- A handler that returns nothing at all (INSERT without RETURNING) has no columns.
CREATE FUNCTION omni_httpd._handler_columns(query text)
    RETURNS regtype[]
    LANGUAGE plpgsql
AS $$
DECLARE
    probe_request constant text :=
        'SELECT NULL::omni_http.http_method AS method, NULL::text AS path, '
        'NULL::text AS query_string, NULL::bytea AS body, '
        'NULL::omni_http.http_header[] AS headers';
    probe_table text := format('omni_httpd_probe_%s_%s', pg_backend_pid(),
                               (random() * 1e9)::bigint);
    aliases text;
    k int := 0;
    first_error text;
    wrapping record;
    columns regtype[];
BEGIN
    LOOP
        wrapping := omni_httpd._wrap_handler_query($1, probe_request, aliases);
        BEGIN
            EXECUTE format('CREATE TEMPORARY TABLE %I AS %s SELECT %s WITH NO DATA',
                           probe_table, wrapping.wrapped,
                           CASE WHEN wrapping.returns_rows THEN '* FROM omni_httpd_handler' ELSE '' END);
            SELECT coalesce(array_agg(a.atttypid::regtype ORDER BY a.attnum), ARRAY[]::regtype[])
            INTO columns
            FROM pg_catalog.pg_attribute a
            WHERE a.attrelid = format('pg_temp.%I', probe_table)::regclass
              AND a.attnum > 0 AND NOT a.attisdropped;
            -- Roll the probe back: that drops the table, and would undo the changes of
            -- a data-modifying handler if some server version did run it.
            RAISE EXCEPTION USING ERRCODE = 'OH001', MESSAGE = 'probe done';
        EXCEPTION
            WHEN SQLSTATE 'OH001' THEN
                EXIT;
            WHEN duplicate_column THEN
                IF k = 0 THEN
                    first_error := SQLERRM;
                END IF;
                k := k + 1;
                IF k > 1664 THEN
                    RAISE;
                END IF;
                SELECT string_agg('c' || i, ', ' ORDER BY i) INTO aliases FROM generate_series(1, k) i;
            WHEN OTHERS THEN
                -- Renaming columns cannot cause any other error unless the duplicate
                -- was not in the output (INSERT INTO t (a, a) ...): report that one.
                IF k > 0 THEN
                    RAISE EXCEPTION USING ERRCODE = 'duplicate_column', MESSAGE = first_error;
                END IF;
                RAISE;
        END;
    END LOOP;
    RETURN columns;
END
$$;

-- Checked when the transaction commits (deferred), so a query that becomes valid later
-- in the same transaction (a table created after the handler) is accepted.
CREATE FUNCTION omni_httpd._check_handler_query()
    RETURNS trigger
    LANGUAGE plpgsql
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
    IF coalesce(array_length(omni_httpd._split_statements(current_query), 1), 0) <> 1 THEN
        RAISE EXCEPTION 'query can only contain one statement' USING ERRCODE = 'check_violation';
    END IF;
    BEGIN
        PERFORM omni_httpd._handler_columns(current_query);
    EXCEPTION WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS problem = MESSAGE_TEXT;
        RAISE EXCEPTION 'invalid query' USING DETAIL = problem, ERRCODE = 'check_violation';
    END;
    RETURN NULL;
END
$$;

CREATE CONSTRAINT TRIGGER handlers_query_check
    AFTER INSERT OR UPDATE ON omni_httpd.handlers
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION omni_httpd._check_handler_query();

-- cascading_query(name, query ORDER BY priority): one query made of several, each a CTE
-- called `name`; the result is the first one's rows if it has any, else the second's...
CREATE FUNCTION omni_httpd._cascading_query_add(state text[], name text, query text)
    RETURNS text[]
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN $2 IS NULL OR $3 IS NULL THEN $1 ELSE $1 || ARRAY[$2, $3] END
$$;

CREATE FUNCTION omni_httpd._cascading_query_build(state text[])
    RETURNS text
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
DECLARE
    pairs int := coalesce(array_length($1, 1), 0) / 2;
    definitions text[] := ARRAY[]::text[];
    branches text[] := ARRAY[]::text[];
    earlier_empty text[] := ARRAY[]::text[];
    statements text[];
    cte text;
BEGIN
    IF pairs = 0 THEN
        RETURN NULL;
    END IF;
    FOR i IN 1 .. pairs LOOP
        cte := quote_ident($1[2 * i - 1]);
        statements := omni_httpd._split_statements($1[2 * i]);
        IF coalesce(array_length(statements, 1), 0) <> 1 THEN
            RAISE EXCEPTION 'query can only contain one statement'
                USING DETAIL = format('in the query named %s', $1[2 * i - 1]);
        END IF;
        definitions := definitions || format(E'%s AS (\n%s\n)', cte, statements[1]);
        branches := branches || (format('SELECT * FROM %s', cte)
            || CASE WHEN i > 1 THEN ' WHERE ' || array_to_string(earlier_empty, ' AND ') ELSE '' END);
        earlier_empty := earlier_empty || format('NOT EXISTS (SELECT FROM %s)', cte);
    END LOOP;
    RETURN 'WITH ' || array_to_string(definitions, E',\n')
        || E'\n' || array_to_string(branches, E'\nUNION ALL\n');
END
$$;

CREATE AGGREGATE omni_httpd.cascading_query(name text, query text) (
    SFUNC = omni_httpd._cascading_query_add,
    STYPE = text[],
    FINALFUNC = omni_httpd._cascading_query_build,
    INITCOND = '{}'
);
