-- Schema omni_httpd, part 7: routes (docs/sql-api.md, "Routes"), compatible with
-- Omnigres' omni_httpd 0.4: URL-pattern routers whose rows name SQL functions and
-- procedures, middleware, and the role each route runs as.
--
-- What is decided here and what in the worker: PostgreSQL cannot run the WHATWG URL
-- Pattern implementation the worker matches with, so a route's pattern is checked twice.
-- At commit (a deferred constraint trigger on every router) a PL/pgSQL check of the
-- pattern syntax refuses what is malformed (unbalanced groups and regexps, a `:` without
-- a name, a dangling `\`); the worker then compiles each pattern with the `urlpattern`
-- package and logs and skips any it still refuses (e.g. a regexp PostgreSQL's check
-- cannot judge).

CREATE TYPE omni_httpd.urlpattern AS (
    protocol text,
    username text,
    password text,
    hostname text,
    port int,
    pathname text,
    search text,
    hash text,
    method omni_http.http_method
);

-- NULL means "any" for every component.
CREATE FUNCTION omni_httpd.urlpattern(pathname text DEFAULT NULL, search text DEFAULT NULL,
                                      hash text DEFAULT NULL,
                                      method omni_http.http_method DEFAULT NULL,
                                      hostname text DEFAULT NULL, port int DEFAULT NULL,
                                      protocol text DEFAULT NULL, username text DEFAULT NULL,
                                      password text DEFAULT NULL)
    RETURNS omni_httpd.urlpattern
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT ROW($7, $8, $9, $5, $6, $1, $2, $3, $4)::omni_httpd.urlpattern $$;

-- Higher runs first; NULL counts as 0.
CREATE DOMAIN omni_httpd.route_priority AS int;

-- What is wrong with one pattern string (NULL: nothing this check can see). Follows the
-- tokenizer of the WHATWG URL Pattern standard: `\` escapes the next character, `:name`
-- is a named group (name: letters, digits, `_`, `$`, or any non-ASCII character, not
-- starting with a digit), `(...)` a regexp group (balanced, not empty, no capturing
-- group inside, not starting with `?`, ASCII only), `{...}` a non-capturing group (not
-- nested), `*` `+` `?` modifiers.
CREATE FUNCTION omni_httpd._urlpattern_string_problem(pattern text)
    RETURNS text
    LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n int := pg_catalog.length($1);
    i int := 1;
    c text;
    depth int;
    regexp_start int;
    in_group boolean := false;
    name_length int;
BEGIN
    WHILE i <= n LOOP
        c := pg_catalog.substr($1, i, 1);
        IF c = '\' THEN
            IF i = n THEN
                RETURN pg_catalog.format('a "\" at the end (position %s) escapes nothing', i);
            END IF;
            i := i + 2;
            CONTINUE;
        ELSIF c = '{' THEN
            IF in_group THEN
                RETURN pg_catalog.format('"{" at position %s: groups cannot be nested', i);
            END IF;
            in_group := true;
        ELSIF c = '}' THEN
            IF NOT in_group THEN
                RETURN pg_catalog.format('"}" at position %s closes no group', i);
            END IF;
            in_group := false;
        ELSIF c = ':' THEN
            name_length := 0;
            WHILE i + name_length + 1 <= n LOOP
                c := pg_catalog.substr($1, i + name_length + 1, 1);
                EXIT WHEN NOT (c ~ '^[A-Za-z_$]$' OR pg_catalog.ascii(c) > 127
                               OR (name_length > 0 AND c ~ '^[0-9]$'));
                name_length := name_length + 1;
            END LOOP;
            IF name_length = 0 THEN
                RETURN pg_catalog.format('":" at position %s is not followed by a group name', i);
            END IF;
            i := i + name_length + 1;
            CONTINUE;
        ELSIF c = '(' THEN
            regexp_start := i;
            depth := 1;
            i := i + 1;
            IF i <= n AND pg_catalog.substr($1, i, 1) = '?' THEN
                RETURN pg_catalog.format('the regexp group at position %s starts with "?"', regexp_start);
            END IF;
            WHILE i <= n AND depth > 0 LOOP
                c := pg_catalog.substr($1, i, 1);
                IF pg_catalog.ascii(c) > 127 THEN
                    RETURN pg_catalog.format('the regexp group at position %s holds a non-ASCII character',
                                             regexp_start);
                ELSIF c = '\' THEN
                    i := i + 1;
                ELSIF c = ')' THEN
                    depth := depth - 1;
                ELSIF c = '(' THEN
                    depth := depth + 1;
                    IF i = n OR pg_catalog.substr($1, i + 1, 1) <> '?' THEN
                        RETURN pg_catalog.format('the regexp group at position %s holds a capturing '
                                                 'group (use "(?:...)")', regexp_start);
                    END IF;
                END IF;
                i := i + 1;
            END LOOP;
            IF depth > 0 THEN
                RETURN pg_catalog.format('the regexp group at position %s is not closed', regexp_start);
            END IF;
            IF i - regexp_start = 2 THEN
                RETURN pg_catalog.format('the regexp group at position %s is empty', regexp_start);
            END IF;
            CONTINUE;
        ELSIF c = ')' THEN
            RETURN pg_catalog.format('")" at position %s closes no group', i);
        END IF;
        i := i + 1;
    END LOOP;
    IF in_group THEN
        RETURN 'a "{" group is not closed';
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION omni_httpd._urlpattern_problem(pattern omni_httpd.urlpattern)
    RETURNS text
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    component record;
    problem text;
BEGIN
    IF $1 IS NULL THEN
        RETURN NULL;
    END IF;
    IF ($1).port IS NOT NULL AND NOT (($1).port BETWEEN 0 AND 65535) THEN
        RETURN pg_catalog.format('port %s is not between 0 and 65535', ($1).port);
    END IF;
    FOR component IN
        SELECT c.name, c.value FROM (VALUES
            (1, 'protocol', ($1).protocol), (2, 'username', ($1).username),
            (3, 'password', ($1).password), (4, 'hostname', ($1).hostname),
            (5, 'pathname', ($1).pathname), (6, 'search', ($1).search),
            (7, 'hash', ($1).hash)) AS c (position, name, value)
        WHERE c.value IS NOT NULL ORDER BY c.position
    LOOP
        problem := omni_httpd._urlpattern_string_problem(component.value);
        IF problem IS NOT NULL THEN
            RETURN pg_catalog.format('%s %L: %s', component.name, component.value, problem);
        END IF;
    END LOOP;
    RETURN NULL;
END
$$;

-- The role a function runs as when a route names it; without a row, its owner. Writing
-- a row needs what writing handlers.role_name needs: the writer can become the role.
CREATE TABLE omni_httpd.handler_role (
    handler regprocedure PRIMARY KEY,
    role regrole NOT NULL
        CONSTRAINT handler_role_role_check CHECK (omni_httpd._can_become(role::pg_catalog.text::name))
);

CREATE TRIGGER handler_role_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON omni_httpd.handler_role
    FOR EACH STATEMENT EXECUTE FUNCTION omni_httpd._configuration_changed();

-- The role a route to `handler` runs as. NULL: no such function, or its handler_role
-- row names a role that was dropped since (regrole records no dependency): such a route
-- is refused, never run as the function's owner instead.
CREATE FUNCTION omni_httpd._route_role(handler regprocedure)
    RETURNS name
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN EXISTS (SELECT FROM omni_httpd.handler_role hr
                             WHERE hr.handler::pg_catalog.oid OPERATOR(pg_catalog.=) $1::pg_catalog.oid)
                THEN (SELECT r.rolname FROM omni_httpd.handler_role hr
                      JOIN pg_catalog.pg_roles r ON r.oid OPERATOR(pg_catalog.=) hr.role::pg_catalog.oid
                      WHERE hr.handler::pg_catalog.oid OPERATOR(pg_catalog.=) $1::pg_catalog.oid)
                ELSE (SELECT o.rolname FROM pg_catalog.pg_proc p
                      JOIN pg_catalog.pg_roles o ON o.oid OPERATOR(pg_catalog.=) p.proowner
                      WHERE p.oid OPERATOR(pg_catalog.=) $1::pg_catalog.oid) END
$$;

-- Is `relation` a router: exactly one column of type urlpattern, exactly one of type
-- regprocedure, at most one of type route_priority. Returns those columns' names
-- (priority NULL when there is none), or no row.
CREATE FUNCTION omni_httpd._router_columns(relation regclass,
                                           OUT match_column name, OUT handler_column name,
                                           OUT priority_column name)
    RETURNS SETOF record
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT (pg_catalog.array_agg(a.attname) FILTER (WHERE a.atttypid OPERATOR(pg_catalog.=) 'omni_httpd.urlpattern'::pg_catalog.regtype))[1],
           (pg_catalog.array_agg(a.attname) FILTER (WHERE a.atttypid OPERATOR(pg_catalog.=) 'pg_catalog.regprocedure'::pg_catalog.regtype))[1],
           (pg_catalog.array_agg(a.attname) FILTER (WHERE a.atttypid OPERATOR(pg_catalog.=) 'omni_httpd.route_priority'::pg_catalog.regtype))[1]
    FROM pg_catalog.pg_class c
    JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) c.oid
    WHERE c.oid OPERATOR(pg_catalog.=) $1::pg_catalog.oid AND c.relkind IN ('r', 'p')
      AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped
    HAVING pg_catalog.count(*) FILTER (WHERE a.atttypid OPERATOR(pg_catalog.=) 'omni_httpd.urlpattern'::pg_catalog.regtype) OPERATOR(pg_catalog.=) 1
       AND pg_catalog.count(*) FILTER (WHERE a.atttypid OPERATOR(pg_catalog.=) 'pg_catalog.regprocedure'::pg_catalog.regtype) OPERATOR(pg_catalog.=) 1
       AND pg_catalog.count(*) FILTER (WHERE a.atttypid OPERATOR(pg_catalog.=) 'omni_httpd.route_priority'::pg_catalog.regtype) OPERATOR(pg_catalog.<=) 1
$$;

-- How a route handler is called, from its signature (NULL kind: it cannot be one):
--   kind: 'handler' (a function returning http_outcome, or a procedure with an OUT
--         http_outcome parameter) or 'middleware' (an INOUT http_outcome parameter);
--   arguments: per parameter what fills it: 'listener' (int), 'request' (http_request),
--         'route' (the router's row type), 'outcome' (the INOUT one), 'out' (the OUT one);
--   problem: why it cannot be a route handler.
CREATE FUNCTION omni_httpd._route_signature(handler regprocedure, router regclass,
                                            OUT kind text, OUT is_procedure boolean,
                                            OUT arguments text[], OUT problem text)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    p record;
    types oid[];
    modes text[];
    row_type oid := (SELECT c.reltype FROM pg_catalog.pg_class c WHERE c.oid OPERATOR(pg_catalog.=) $2::pg_catalog.oid);
    outcome_type constant oid := 'omni_httpd.http_outcome'::pg_catalog.regtype;
    outcome_modes text[] := ARRAY[]::text[];
    i int;
BEGIN
    arguments := ARRAY[]::text[];
    SELECT pr.prokind, pr.prorettype, pr.proretset, pr.proargtypes, pr.proallargtypes, pr.proargmodes
    INTO p FROM pg_catalog.pg_proc pr WHERE pr.oid OPERATOR(pg_catalog.=) $1::pg_catalog.oid;
    IF NOT FOUND THEN
        problem := pg_catalog.format('function %s does not exist', $1::pg_catalog.oid);
        RETURN;
    END IF;
    is_procedure := p.prokind OPERATOR(pg_catalog.=) 'p';
    IF p.prokind NOT IN ('f', 'p') THEN
        problem := pg_catalog.format('%s is not a function or a procedure', $1);
        RETURN;
    END IF;
    IF p.proretset THEN
        problem := pg_catalog.format('%s returns a set', $1);
        RETURN;
    END IF;
    IF p.proallargtypes IS NULL THEN
        -- (an oidvector counts from 0; the text form gives an array counted from 1)
        types := pg_catalog.string_to_array(p.proargtypes::pg_catalog.text, ' ')::oid[];
        modes := pg_catalog.array_fill('i'::text, ARRAY[pg_catalog.cardinality(types)]);
    ELSE
        types := p.proallargtypes;
        modes := p.proargmodes::text[];
    END IF;
    FOR i IN 1 .. coalesce(pg_catalog.cardinality(types), 0) LOOP
        IF modes[i] IN ('o', 'b', 't') AND types[i] OPERATOR(pg_catalog.<>) outcome_type THEN
            problem := pg_catalog.format('%s: an OUT or INOUT parameter must be of type omni_httpd.http_outcome', $1);
            RETURN;
        ELSIF modes[i] IN ('o', 'b') THEN
            outcome_modes := outcome_modes || modes[i];
            arguments := arguments || CASE modes[i] WHEN 'b' THEN 'outcome' ELSE 'out' END;
        ELSIF modes[i] OPERATOR(pg_catalog.=) 'v' THEN
            problem := pg_catalog.format('%s: VARIADIC parameters cannot be filled', $1);
            RETURN;
        ELSIF types[i] OPERATOR(pg_catalog.=) 'pg_catalog.int4'::pg_catalog.regtype THEN
            arguments := arguments || 'listener'::text;
        ELSIF types[i] OPERATOR(pg_catalog.=) 'omni_httpd.http_request'::pg_catalog.regtype THEN
            arguments := arguments || 'request'::text;
        ELSIF types[i] OPERATOR(pg_catalog.=) row_type THEN
            arguments := arguments || 'route'::text;
        ELSE
            problem := pg_catalog.format('%s: parameter %s has type %s; route handlers take only int '
                                         '(the listener), omni_httpd.http_request and %s (the route)',
                                         $1, i, types[i]::pg_catalog.regtype, row_type::pg_catalog.regtype);
            RETURN;
        END IF;
    END LOOP;
    IF pg_catalog.cardinality(outcome_modes) OPERATOR(pg_catalog.>) 1 THEN
        problem := pg_catalog.format('%s has more than one omni_httpd.http_outcome parameter', $1);
    ELSIF outcome_modes OPERATOR(pg_catalog.=) ARRAY['b'] THEN
        kind := 'middleware';
    ELSIF outcome_modes OPERATOR(pg_catalog.=) ARRAY['o'] THEN
        kind := 'handler';
    ELSIF NOT is_procedure AND pg_catalog.cardinality(outcome_modes) OPERATOR(pg_catalog.=) 0
          AND p.prorettype OPERATOR(pg_catalog.=) outcome_type THEN
        kind := 'handler';
    ELSE
        problem := pg_catalog.format('%s is neither a handler (a function returning omni_httpd.http_outcome, '
                                     'a procedure with an OUT omni_httpd.http_outcome parameter) nor a '
                                     'middleware (an INOUT omni_httpd.http_outcome parameter)', $1);
    END IF;
END
$$;

-- Does the procedure's own text control transactions (COMMIT / ROLLBACK outside a
-- string or comment)? Such a procedure cannot run inside the SECURITY DEFINER function
-- that confines a route's role (PostgreSQL refuses transaction control there). A
-- procedure that controls transactions only through another one it calls is not seen
-- here; it fails ("invalid transaction termination") rather than running unconfined.
CREATE FUNCTION omni_httpd._controls_transactions(handler regprocedure)
    RETURNS boolean
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT EXISTS (
        SELECT FROM pg_catalog.pg_proc p,
             omni_httpd._sql_tokens(p.prosrc, true) t
        WHERE p.oid OPERATOR(pg_catalog.=) $1::pg_catalog.oid AND p.prokind OPERATOR(pg_catalog.=) 'p'
          AND t.kind OPERATOR(pg_catalog.=) 'word' AND t.token IN ('commit', 'rollback'))
$$;

-- The commit-time check of a route row (deferred constraint trigger on every router,
-- run as the writer): the pattern is well formed, the handler can be one, and the writer
-- can become the role the route will run as (its handler_role, else the function's
-- owner), as for handlers.role_name.
CREATE FUNCTION omni_httpd._check_route()
    RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    columns record;
    pattern omni_httpd.urlpattern;
    handler regprocedure;
    problem text;
    signature record;
    route_role name;
BEGIN
    SELECT * INTO columns FROM omni_httpd._router_columns(TG_RELID);
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    EXECUTE pg_catalog.format('SELECT (($1).%I).*', columns.match_column) INTO pattern USING NEW;
    EXECUTE pg_catalog.format('SELECT ($1).%I', columns.handler_column) INTO handler USING NEW;
    problem := omni_httpd._urlpattern_problem(pattern);
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION 'invalid URL pattern' USING DETAIL = problem, ERRCODE = 'check_violation';
    END IF;
    IF handler IS NULL THEN
        RETURN NULL;
    END IF;
    signature := omni_httpd._route_signature(handler, TG_RELID);
    IF signature.problem IS NOT NULL THEN
        RAISE EXCEPTION 'invalid route handler' USING DETAIL = signature.problem, ERRCODE = 'check_violation';
    END IF;
    route_role := omni_httpd._route_role(handler);
    IF route_role IS NULL OR NOT omni_httpd._can_become(route_role) THEN
        RAISE EXCEPTION 'invalid route handler'
            USING DETAIL = pg_catalog.format('%s runs as role %s, which %s cannot become (set '
                                             'omni_httpd.handler_role for it)', handler, route_role, current_user),
                  ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END
$$;

-- Makes a table a router the daemon follows: a trigger that asks for a reload when its
-- rows change and the commit-time check above. Runs as the caller, who must own the
-- table. The event trigger below calls it for every router created or altered; where
-- the daemon cannot create event triggers (no superuser), the table's owner calls it
-- once after creating the table: SELECT omni_httpd.register_router('my_router').
CREATE FUNCTION omni_httpd.register_router(router regclass)
    RETURNS boolean
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT EXISTS (SELECT FROM omni_httpd._router_columns($1)) THEN
        RAISE EXCEPTION '% is not a router', $1
            USING HINT = 'A router has exactly one column of type omni_httpd.urlpattern, one of type '
                         'regprocedure and at most one of type omni_httpd.route_priority.';
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_trigger t WHERE t.tgrelid OPERATOR(pg_catalog.=) $1::pg_catalog.oid
                   AND t.tgname OPERATOR(pg_catalog.=) 'omni_httpd_routes_changed') THEN
        EXECUTE pg_catalog.format('CREATE TRIGGER omni_httpd_routes_changed AFTER INSERT OR UPDATE OR DELETE '
                                  'OR TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION '
                                  'omni_httpd._configuration_changed()', $1);
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_trigger t WHERE t.tgrelid OPERATOR(pg_catalog.=) $1::pg_catalog.oid
                   AND t.tgname OPERATOR(pg_catalog.=) 'omni_httpd_route_check') THEN
        EXECUTE pg_catalog.format('CREATE CONSTRAINT TRIGGER omni_httpd_route_check AFTER INSERT OR UPDATE '
                                  'ON %s DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION '
                                  'omni_httpd._check_route()', $1);
    END IF;
    PERFORM omni_httpd.reload_configuration();
    RETURN true;
END
$$;

-- Event trigger (only where the daemon may create one: as a superuser). Runs as the
-- role whose DDL fired it (no SECURITY DEFINER), with names pinned; it never makes that
-- DDL fail: a problem is a WARNING.
CREATE FUNCTION omni_httpd._router_ddl()
    RETURNS event_trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    command record;
BEGIN
    IF TG_EVENT = 'sql_drop' THEN
        IF EXISTS (SELECT FROM pg_catalog.pg_event_trigger_dropped_objects() o
                   WHERE o.object_type = 'trigger'
                     AND o.object_identity LIKE 'omni\_httpd\_routes\_changed on %') THEN
            PERFORM omni_httpd.reload_configuration();
        END IF;
        RETURN;
    END IF;
    FOR command IN SELECT DISTINCT c.objid FROM pg_catalog.pg_event_trigger_ddl_commands() c
                   WHERE c.object_type = 'table' AND c.classid = 'pg_catalog.pg_class'::pg_catalog.regclass LOOP
        BEGIN
            IF EXISTS (SELECT FROM omni_httpd._router_columns(command.objid::pg_catalog.regclass)) THEN
                PERFORM omni_httpd.register_router(command.objid::pg_catalog.regclass);
            ELSIF EXISTS (SELECT FROM pg_catalog.pg_trigger t WHERE t.tgrelid = command.objid
                          AND t.tgname = 'omni_httpd_routes_changed') THEN
                PERFORM omni_httpd.reload_configuration();     -- no longer a router
            END IF;
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'omni_httpd: table % could not be checked or registered as a router: %',
                command.objid::pg_catalog.regclass, SQLERRM
                USING HINT = 'Its owner can call omni_httpd.register_router() for it.';
        END;
    END LOOP;
END
$$;

DO $$
BEGIN
    IF (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname = current_user) THEN
        CREATE EVENT TRIGGER omni_httpd_router_ddl ON ddl_command_end
            WHEN TAG IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO', 'ALTER TABLE')
            EXECUTE FUNCTION omni_httpd._router_ddl();
        CREATE EVENT TRIGGER omni_httpd_router_drop ON sql_drop
            EXECUTE FUNCTION omni_httpd._router_ddl();
    END IF;
END
$$;

-- The router every database has.
CREATE TABLE omni_httpd.urlpattern_router (
    match omni_httpd.urlpattern NOT NULL,
    handler regprocedure NOT NULL,
    priority omni_httpd.route_priority NOT NULL DEFAULT 0
);
SELECT omni_httpd.register_router('omni_httpd.urlpattern_router');

-- Every route of every router, for the master (run as the daemon's role): routers it
-- may not read are reported, not fatal. row_security is off, so reading a router never
-- runs a policy expression of its owner's with the daemon's rights (a router with a
-- policy that would apply is reported instead).
CREATE FUNCTION omni_httpd._routes()
    RETURNS TABLE (router regclass, router_owner name, route text, route_position bigint,
                   protocol text, username text, password text, hostname text, port int,
                   pathname text, search text, hash text, method text,
                   handler oid, handler_text text, priority int, problem text)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp
    SET row_security = off
AS $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT c.oid::pg_catalog.regclass AS relation, o.rolname AS owner, c.relkind, rc.*
        FROM pg_catalog.pg_class c
        JOIN pg_catalog.pg_roles o ON o.oid OPERATOR(pg_catalog.=) c.relowner
        CROSS JOIN LATERAL omni_httpd._router_columns(c.oid::pg_catalog.regclass) rc
        -- Temporary tables are a session's own (and unreadable by others); partitions
        -- are read through their parent, inheritance children on their own (ONLY).
        WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition AND c.relpersistence <> 't'
          AND EXISTS (SELECT FROM pg_catalog.pg_attribute a WHERE a.attrelid OPERATOR(pg_catalog.=) c.oid
                      AND a.atttypid OPERATOR(pg_catalog.=) 'omni_httpd.urlpattern'::pg_catalog.regtype
                      AND NOT a.attisdropped)
        ORDER BY c.oid
    LOOP
        BEGIN
            RETURN QUERY EXECUTE pg_catalog.format(
                'SELECT %1$L::pg_catalog.regclass, %2$L::name, t::pg_catalog.text, '
                'pg_catalog.row_number() OVER (), (t.%3$I).protocol, (t.%3$I).username, '
                '(t.%3$I).password, (t.%3$I).hostname, (t.%3$I).port, (t.%3$I).pathname, '
                '(t.%3$I).search, (t.%3$I).hash, (t.%3$I).method::pg_catalog.text, '
                't.%4$I::pg_catalog.oid, t.%4$I::pg_catalog.text, %5$s, NULL::pg_catalog.text '
                'FROM %6$s %1$s t WHERE t.%4$I IS NOT NULL',
                r.relation, r.owner, r.match_column, r.handler_column,
                CASE WHEN r.priority_column IS NULL THEN '0'
                     ELSE pg_catalog.format('coalesce(t.%I, 0)::pg_catalog.int4', r.priority_column) END,
                CASE WHEN r.relkind = 'r' THEN 'ONLY' ELSE '' END);
        EXCEPTION WHEN OTHERS THEN
            router := r.relation;
            router_owner := r.owner;
            problem := SQLERRM;
            RETURN NEXT;
        END;
    END LOOP;
END
$$;

-- Is the daemon's login role one with nothing of its own to gain for a procedure that
-- does RESET ROLE: no superuser or other role attributes, and NOINHERIT (the roles it
-- can become lend it nothing unless it switches to them). The PostgREST-style
-- "authenticator"; its object privileges are the daemon's bookkeeping (docs/sql-api.md).
CREATE FUNCTION omni_httpd._login_role_is_unprivileged()
    RETURNS boolean
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT NOT (r.rolsuper OR r.rolinherit OR r.rolcreaterole OR r.rolcreatedb OR r.rolbypassrls
                OR r.rolreplication)
    FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) session_user
$$;

-- For non-atomic procedures (a CALL argument cannot hold a subquery): the request and
-- the outcome so far from the protocol parameters, and the outcome flattened after.
CREATE FUNCTION omni_httpd._route_request(method omni_http.http_method, path text, query_string text,
                                          body bytea, header_names text[], header_values text[])
    RETURNS omni_httpd.http_request
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT ROW($1, $2, $3, $4, ARRAY(SELECT ROW(h.name, h.value)::omni_http.http_header
                                     FROM ROWS FROM (pg_catalog.unnest($5), pg_catalog.unnest($6)) AS h(name, value))
              )::omni_httpd.http_request
$$;

CREATE FUNCTION omni_httpd._route_outcome(kind text, status int, header_names text[],
                                          header_values text[], body bytea, proxy_url text,
                                          preserve_host boolean)
    RETURNS omni_httpd.http_outcome
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE $1
        WHEN 'abort' THEN ROW(NULL, true, NULL)::omni_httpd.http_outcome
        WHEN 'proxy' THEN ROW(NULL, NULL, ROW($6, $7)::omni_httpd.http_proxy)::omni_httpd.http_outcome
        WHEN 'response' THEN ROW(ROW($5, $2::pg_catalog.int2,
                                     ARRAY(SELECT ROW(h.name, h.value)::omni_http.http_header
                                           FROM ROWS FROM (pg_catalog.unnest($3), pg_catalog.unnest($4)) AS h(name, value))
                                 )::omni_httpd.http_response, NULL, NULL)::omni_httpd.http_outcome END
$$;

CREATE FUNCTION omni_httpd._flatten_outcome(outcome omni_httpd.http_outcome)
    RETURNS SETOF omni_httpd._handler_result
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN ($1).abort THEN 'abort'
                WHEN (($1).proxy).url IS NOT NULL THEN 'proxy'
                ELSE 'response' END::pg_catalog.text,
           CASE WHEN pg_catalog.num_nonnulls(($1).response) OPERATOR(pg_catalog.>) 0
                THEN coalesce((($1).response).status, 200)::pg_catalog.int4 END,
           CASE WHEN pg_catalog.num_nonnulls(($1).response) OPERATOR(pg_catalog.>) 0
                THEN ARRAY(SELECT x.name FROM pg_catalog.unnest((($1).response).headers) AS x) END,
           CASE WHEN pg_catalog.num_nonnulls(($1).response) OPERATOR(pg_catalog.>) 0
                THEN ARRAY(SELECT x.value FROM pg_catalog.unnest((($1).response).headers) AS x) END,
           (($1).response).body,
           (($1).proxy).url,
           CASE WHEN (($1).proxy).url IS NOT NULL THEN coalesce((($1).proxy).preserve_host, true) END
    WHERE ($1).abort OR (($1).proxy).url IS NOT NULL
       OR pg_catalog.num_nonnulls(($1).response) OPERATOR(pg_catalog.>) 0
$$;

-- Installing a route in a worker's session: a SECURITY DEFINER function in pg_temp,
-- owned by the route's role, that builds the handler's arguments from the request's
-- protocol parameters (listener id, method, path, query string, body, header names and
-- values, the route row's text, and the outcome so far flattened as in
-- omni_httpd._handler_result: kind, status, header names and values, body, proxy url,
-- preserve host), calls it, flattens its outcome as handler functions do
-- (omni_httpd._handler_result), and cleans the session after it. Refuses (raises) what
-- must not run: a handler that is not one, a role the router's owner cannot become (a
-- router pointing at another role's function would otherwise run it with that role's
-- rights), a function the role may not execute, a procedure that controls transactions
-- (it cannot be confined). Returns the function's oid and row version (checked before
-- every call, as for handlers), and the route's kind.
CREATE FUNCTION omni_httpd._install_route(fname text, handler regprocedure, router regclass,
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
    installer name := current_user;
    qualified text := pg_catalog.format(
        'pg_temp.%I(pg_catalog.int4, omni_http.http_method, pg_catalog.text, pg_catalog.text, '
        'pg_catalog.bytea, pg_catalog.text[], pg_catalog.text[], pg_catalog.text, '
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
                       WHEN 'request' THEN 'omni_httpd._route_request($2, $3, $4, $5, $6, $7)'
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
$decl$request omni_httpd.http_request := ROW($2, $3, $4, $5,
    ARRAY(SELECT ROW(h.name, h.value)::omni_http.http_header
          FROM ROWS FROM (pg_catalog.unnest($6), pg_catalog.unnest($7)) AS h(name, value))
    )::omni_httpd.http_request;
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
RETURN QUERY
SELECT CASE WHEN (outcome).abort THEN 'abort'
            WHEN ((outcome).proxy).url IS NOT NULL THEN 'proxy'
            ELSE 'response' END::pg_catalog.text,
       CASE WHEN pg_catalog.num_nonnulls((outcome).response) OPERATOR(pg_catalog.>) 0
            THEN coalesce(((outcome).response).status, 200)::pg_catalog.int4 END,
       CASE WHEN pg_catalog.num_nonnulls((outcome).response) OPERATOR(pg_catalog.>) 0
            THEN ARRAY(SELECT x.name FROM pg_catalog.unnest(((outcome).response).headers) AS x) END,
       CASE WHEN pg_catalog.num_nonnulls((outcome).response) OPERATOR(pg_catalog.>) 0
            THEN ARRAY(SELECT x.value FROM pg_catalog.unnest(((outcome).response).headers) AS x) END,
       ((outcome).response).body,
       ((outcome).proxy).url,
       CASE WHEN ((outcome).proxy).url IS NOT NULL
            THEN coalesce(((outcome).proxy).preserve_host, true) END
WHERE (outcome).abort OR ((outcome).proxy).url IS NOT NULL
   OR pg_catalog.num_nonnulls((outcome).response) OPERATOR(pg_catalog.>) 0;
PERFORM omni_httpd._after_request();
EXCEPTION WHEN OTHERS OR query_canceled OR assert_failure THEN
    -- A failed route cleans up too, before its error goes on unchanged: the worker may
    -- already have sent the next request behind it (pipelining, sql/012_pipelining.sql).
    PERFORM omni_httpd._after_request();
    RAISE;
END
$body$, declarations, invocation);

    EXECUTE pg_catalog.format('DROP FUNCTION IF EXISTS %s', qualified);
    PERFORM pg_catalog.set_config('search_path', omni_httpd._handler_search_path(), true);
    EXECUTE pg_catalog.format(
        'CREATE FUNCTION %s RETURNS SETOF omni_httpd._handler_result LANGUAGE plpgsql '
        'SECURITY DEFINER SET search_path FROM CURRENT AS %L', qualified, function_body);
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', qualified);
    IF role_name <> installer THEN
        EXECUTE pg_catalog.format('ALTER FUNCTION %s OWNER TO %I', qualified, role_name);
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO %I', qualified, installer);
    END IF;
    SELECT p.oid, p.xmin INTO function_oid, function_xmin
    FROM pg_catalog.pg_proc p WHERE p.oid OPERATOR(pg_catalog.=) qualified::pg_catalog.regprocedure;
END
$$;

-- Where no handler of the route chain exists, the daemon answers with the outcome the
-- middleware left (or 404); nothing more to install for that.

GRANT USAGE ON TYPE omni_httpd.urlpattern, omni_httpd.route_priority TO PUBLIC;
GRANT EXECUTE ON FUNCTION
    omni_httpd.urlpattern(text, text, text, omni_http.http_method, text, int, text, text, text),
    omni_httpd._urlpattern_string_problem(text), omni_httpd._urlpattern_problem(omni_httpd.urlpattern),
    omni_httpd._route_role(regprocedure), omni_httpd._router_columns(regclass),
    omni_httpd._route_signature(regprocedure, regclass), omni_httpd._controls_transactions(regprocedure),
    omni_httpd._check_route(), omni_httpd.register_router(regclass),
    omni_httpd._route_request(omni_http.http_method, text, text, bytea, text[], text[]),
    omni_httpd._route_outcome(text, int, text[], text[], bytea, text, boolean)
    TO PUBLIC;
-- Every role's route check reads handler_role (which role its routes run as).
GRANT SELECT ON omni_httpd.handler_role TO PUBLIC;
