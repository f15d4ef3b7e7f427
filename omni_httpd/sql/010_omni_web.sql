-- Schema omni_web: request helpers for handlers (docs/sql-api.md, "Request helpers
-- (omni_web)"): query strings and urlencoded forms, percent-encoding, cookies and
-- multipart/form-data bodies. Names and signatures follow Omnigres' omni_web, so its
-- users' handlers run unchanged.
--
-- Every function is a pure helper: it reads only its arguments, so it is IMMUTABLE,
-- PARALLEL SAFE, executable by PUBLIC, and pins search_path like the runtime's own.
-- No function loops over bytes in PL/pgSQL: strings are split with string_to_array and
-- regular expressions, so the work grows with the input's length, not its square.
--
-- Errors (SQLSTATE):
--   22025 invalid_escape_sequence      a `%` not followed by two hexadecimal digits
--   22021 character_not_in_repertoire  decoded bytes (or a form body) that are not UTF-8
--   22023 invalid_parameter_value      a cookie or Content-Type that cannot be used
--   22P02 invalid_text_representation  a malformed multipart body

-- IF NOT EXISTS: another migration (e.g. routes' URL patterns, also in Omnigres'
-- omni_web) may have created the schema already.
CREATE SCHEMA IF NOT EXISTS omni_web;
GRANT USAGE ON SCHEMA omni_web TO PUBLIC;

-- name, value, name, value, ...: what parse_query_string returns.
CREATE DOMAIN omni_web.params AS text[]
    CHECK (pg_catalog.array_ndims(VALUE) IS NULL
           OR (pg_catalog.array_ndims(VALUE) = 1 AND pg_catalog.array_length(VALUE, 1) % 2 = 0));

-- A request-supplied string as an error message shows it: at most 100 characters,
-- control characters as `?`, so that no message (or log line made of it) gains a line.
CREATE FUNCTION omni_web._shown(text)
    RETURNS text
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
AS $$ SELECT pg_catalog.regexp_replace(pg_catalog.left($1, 100), '[[:cntrl:]]', '?', 'g') $$;

-- 1. Percent-encoding -----------------------------------------------------------------

-- The bytes `encoded` stands for: each %XX is the byte XX, everything else its UTF-8.
-- With keep_reserved, an escape of a character that is reserved in a URI (;/?:@&=+$,#)
-- is kept as written, as JavaScript's decodeURI does, so the URI keeps its structure.
CREATE FUNCTION omni_web._percent_decode(encoded text, keep_reserved boolean)
    RETURNS text
    LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    bad text;
    bytes bytea;
BEGIN
    IF pg_catalog.strpos(encoded, '%') = 0 THEN
        RETURN encoded;
    END IF;
    bad := pg_catalog.substring(encoded, '%(?![0-9A-Fa-f]{2}).{0,2}');
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'invalid percent-encoding "%": "%%" must be followed by two hexadecimal digits', omni_web._shown(bad)
            USING ERRCODE = 'invalid_escape_sequence';
    END IF;
    SELECT pg_catalog.string_agg(
               CASE
                   WHEN u.n = 1 THEN pg_catalog.convert_to(u.piece, 'UTF8')
                   WHEN keep_reserved AND pg_catalog.lower(pg_catalog.left(u.piece, 2))
                        IN ('3b', '2f', '3f', '3a', '40', '26', '3d', '2b', '24', '2c', '23')
                       THEN pg_catalog.convert_to('%' || u.piece, 'UTF8')
                   ELSE pg_catalog.decode(pg_catalog.left(u.piece, 2), 'hex')
                        || pg_catalog.convert_to(pg_catalog.substr(u.piece, 3), 'UTF8')
               END, ''::bytea ORDER BY u.n)
    INTO bytes
    FROM pg_catalog.unnest(pg_catalog.string_to_array(encoded, '%')) WITH ORDINALITY AS u (piece, n);
    RETURN pg_catalog.convert_from(bytes, 'UTF8');
EXCEPTION
    WHEN character_not_in_repertoire OR untranslatable_character THEN
        RAISE EXCEPTION 'percent-decoded text is not valid UTF-8'
            USING ERRCODE = 'character_not_in_repertoire', DETAIL = SQLERRM;
END
$$;

-- `plain` with every character outside `safe` (a bracket expression's content) written
-- as %XX of its UTF-8 bytes, upper-case hexadecimal. Runs of safe and unsafe characters
-- are handled one run at a time.
CREATE FUNCTION omni_web._percent_encode(plain text, safe text)
    RETURNS text
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(pg_catalog.string_agg(
               CASE WHEN m.run[1] IS NOT NULL THEN m.run[1]
                    ELSE pg_catalog.regexp_replace(
                             pg_catalog.upper(pg_catalog.encode(pg_catalog.convert_to(m.run[2], 'UTF8'), 'hex')),
                             '(..)', '%\1', 'g')
               END, '' ORDER BY m.n), '')
    FROM pg_catalog.regexp_matches($1, '([' || $2 || ']+)|([^' || $2 || ']+)', 'g') WITH ORDINALITY AS m (run, n)
$$;

-- A query-string or form component: everything but A-Z a-z 0-9 - . _ ~ is escaped
-- (a space is %20), like JavaScript's encodeURIComponent.
CREATE FUNCTION omni_web.url_encode(text)
    RETURNS text
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
AS $$ SELECT omni_web._percent_encode($1, 'A-Za-z0-9._~-') $$;

-- Every %XX decoded; `+` stays `+` (parse_query_string turns it into a space).
CREATE FUNCTION omni_web.url_decode(text)
    RETURNS text
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
AS $$ SELECT omni_web._percent_decode($1, false) $$;

-- A whole URI: the reserved characters and `#` are kept, like JavaScript's encodeURI.
CREATE FUNCTION omni_web.uri_encode(text)
    RETURNS text
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
AS $$ SELECT omni_web._percent_encode($1, 'A-Za-z0-9._~!*''();/?:@&=+$,#-') $$;

-- A whole URI: escapes of reserved characters are kept, like JavaScript's decodeURI.
CREATE FUNCTION omni_web.uri_decode(text)
    RETURNS text
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
AS $$ SELECT omni_web._percent_decode($1, true) $$;

-- 2. Query strings and urlencoded forms -------------------------------------------------

-- 'a=1&b=x+y&c' -> {a,1,b,"x y",c,NULL}: pairs separated by `&` (empty ones skipped),
-- name and value split at the first `=`, `+` a space, %XX decoded as UTF-8. A pair
-- without `=` has a NULL value; 'a=' an empty one.
CREATE FUNCTION omni_web.parse_query_string(query_string text)
    RETURNS text[]
    LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    bad text := pg_catalog.substring(query_string, '%(?![0-9A-Fa-f]{2}).{0,2}');
    result text[];
BEGIN
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'invalid percent-encoding "%" in query string: "%%" must be followed by two hexadecimal digits', omni_web._shown(bad)
            USING ERRCODE = 'invalid_escape_sequence';
    END IF;
    -- One statement for all pairs, and no function call per pair (a call with a pinned
    -- search_path costs more than the decoding): components holding a `%` are decoded
    -- as _percent_decode does.
    SELECT coalesce(pg_catalog.array_agg(
               CASE WHEN c.part IS NULL OR pg_catalog.strpos(c.part, '%') = 0 THEN c.part
                    ELSE pg_catalog.convert_from((
                        SELECT pg_catalog.string_agg(
                                   CASE WHEN u.i = 1 THEN pg_catalog.convert_to(u.piece, 'UTF8')
                                        ELSE pg_catalog.decode(pg_catalog.left(u.piece, 2), 'hex')
                                             || pg_catalog.convert_to(pg_catalog.substr(u.piece, 3), 'UTF8')
                                   END, ''::bytea ORDER BY u.i)
                        FROM pg_catalog.unnest(pg_catalog.string_to_array(c.part, '%')) WITH ORDINALITY AS u (piece, i)
                    ), 'UTF8')
               END ORDER BY p.n, c.k), '{}')
    INTO result
    FROM pg_catalog.unnest(pg_catalog.string_to_array(pg_catalog.replace(query_string, '+', ' '), '&'))
             WITH ORDINALITY AS p (pair, n)
         CROSS JOIN LATERAL (VALUES
             (1, CASE WHEN pg_catalog.strpos(p.pair, '=') = 0 THEN p.pair
                      ELSE pg_catalog.left(p.pair, pg_catalog.strpos(p.pair, '=') - 1) END),
             (2, CASE WHEN pg_catalog.strpos(p.pair, '=') = 0 THEN NULL
                      ELSE pg_catalog.substr(p.pair, pg_catalog.strpos(p.pair, '=') + 1) END)
         ) AS c (k, part)
    WHERE p.pair <> '';
    RETURN result;
EXCEPTION
    WHEN character_not_in_repertoire OR untranslatable_character THEN
        RAISE EXCEPTION 'percent-decoded text is not valid UTF-8'
            USING ERRCODE = 'character_not_in_repertoire', DETAIL = SQLERRM;
END
$$;

-- An application/x-www-form-urlencoded body (bytea, as request.body is): it must be
-- UTF-8 (error 22021 otherwise).
CREATE FUNCTION omni_web.parse_query_string(query_string bytea)
    RETURNS text[]
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
AS $$ SELECT omni_web.parse_query_string(pg_catalog.convert_from($1, 'UTF8')) $$;

-- The values of every parameter called `param`, in order (NULL for a pair without `=`).
CREATE FUNCTION omni_web.param_get_all(params omni_web.params, param text)
    RETURNS SETOF text
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT $1[u.i + 1]
    FROM pg_catalog.unnest($1) WITH ORDINALITY AS u (v, i)
    WHERE u.i % 2 = 1 AND u.v = $2
    ORDER BY u.i
$$;

CREATE FUNCTION omni_web.param_get_all(params text, param text)
    RETURNS SETOF text
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
AS $$ SELECT omni_web.param_get_all(omni_web.parse_query_string($1)::omni_web.params, $2) $$;

CREATE FUNCTION omni_web.param_get_all(params bytea, param text)
    RETURNS SETOF text
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
AS $$ SELECT omni_web.param_get_all(omni_web.parse_query_string($1)::omni_web.params, $2) $$;

-- The value of the first parameter called `param`; NULL if there is none (or if it has
-- no `=`).
CREATE FUNCTION omni_web.param_get(params omni_web.params, param text)
    RETURNS text
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
AS $$ SELECT omni_web.param_get_all($1, $2) LIMIT 1 $$;

CREATE FUNCTION omni_web.param_get(params text, param text)
    RETURNS text
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
AS $$ SELECT omni_web.param_get_all(omni_web.parse_query_string($1)::omni_web.params, $2) LIMIT 1 $$;

CREATE FUNCTION omni_web.param_get(params bytea, param text)
    RETURNS text
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
AS $$ SELECT omni_web.param_get_all(omni_web.parse_query_string($1)::omni_web.params, $2) LIMIT 1 $$;

-- 3. Cookies ------------------------------------------------------------------------------

-- The cookies of a Cookie header ('a=1; b=2'), in order. Pairs are separated by `;`
-- with optional white space; the value is everything after the first `=` (so base64
-- padding survives), without surrounding double quotes; a pair without `=` has an empty
-- value. Values are not percent-decoded (cookies have no such rule; use url_decode).
CREATE FUNCTION omni_web.cookies(cookies text)
    RETURNS TABLE (name text, value text)
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT s.name,
           CASE WHEN pg_catalog.length(s.value) >= 2 AND pg_catalog.left(s.value, 1) = '"'
                     AND pg_catalog.right(s.value, 1) = '"'
                THEN pg_catalog.substr(s.value, 2, pg_catalog.length(s.value) - 2)
                ELSE s.value END
    FROM (
        SELECT c.n,
               pg_catalog.btrim(CASE WHEN pg_catalog.strpos(c.pair, '=') = 0 THEN c.pair
                                     ELSE pg_catalog.left(c.pair, pg_catalog.strpos(c.pair, '=') - 1) END,
                                E' \t') AS name,
               pg_catalog.btrim(CASE WHEN pg_catalog.strpos(c.pair, '=') = 0 THEN ''
                                     ELSE pg_catalog.substr(c.pair, pg_catalog.strpos(c.pair, '=') + 1) END,
                                E' \t') AS value
        FROM pg_catalog.unnest(pg_catalog.string_to_array($1, ';')) WITH ORDINALITY AS c (pair, n)
        WHERE pg_catalog.btrim(c.pair, E' \t') <> ''
    ) AS s
    ORDER BY s.n
$$;

-- The value of the first cookie called `cookie_name` (browsers send the one with the
-- most specific path first); NULL if there is none.
CREATE FUNCTION omni_web.cookie_get(cookies text, cookie_name text)
    RETURNS text
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
AS $$ SELECT c.value FROM omni_web.cookies($1) AS c WHERE c.name = $2 LIMIT 1 $$;

-- A Set-Cookie header (RFC 6265) for http_response(headers => ARRAY[...]). Refuses
-- (22023) anything that would split the header or that a browser would read otherwise
-- than meant: a name that is not a token, a value outside cookie-octets (no space, `"`,
-- `,`, `;`, `\`, control or non-ASCII characters: url_encode it first), a Path or
-- Domain with `;` or control characters, an unknown SameSite, SameSite=None without
-- Secure, and the __Secure- / __Host- prefixes (in any letter case, as browsers read
-- them) without what they require.
CREATE FUNCTION omni_web.set_cookie(
        name text, value text,
        max_age int DEFAULT NULL, expires timestamptz DEFAULT NULL,
        path text DEFAULT NULL, domain text DEFAULT NULL,
        secure boolean DEFAULT false, http_only boolean DEFAULT false,
        same_site text DEFAULT NULL)
    RETURNS omni_http.http_header
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    cookie text;
    inner_value text;
    utc timestamp;
    site text;
BEGIN
    IF name IS NULL OR name !~ '^[!#$%&''*+.^_`|~0-9A-Za-z-]+$' THEN
        RAISE EXCEPTION 'invalid cookie name %: it must be a non-empty HTTP token', coalesce(pg_catalog.quote_literal(omni_web._shown(name)), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- cookie-value: cookie-octets (%x21 / %x23-2B / %x2D-3A / %x3C-5B / %x5D-7E), or
    -- the same in one pair of double quotes.
    inner_value := CASE WHEN value ~ '^".*"$' AND pg_catalog.length(value) >= 2
                        THEN pg_catalog.substr(value, 2, pg_catalog.length(value) - 2) ELSE value END;
    IF value IS NULL OR inner_value ~ '[^!-~]' OR pg_catalog.strpos(inner_value, '"') > 0
       OR pg_catalog.strpos(inner_value, ',') > 0 OR pg_catalog.strpos(inner_value, ';') > 0
       OR pg_catalog.strpos(inner_value, E'\\') > 0 THEN
        RAISE EXCEPTION 'invalid value for cookie %: only printable ASCII without space, ", comma, ; and \ is allowed (url_encode it)', name
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    cookie := name || '=' || value;
    IF max_age IS NOT NULL THEN
        cookie := cookie || '; Max-Age=' || max_age;
    END IF;
    IF expires IS NOT NULL THEN
        IF NOT pg_catalog.isfinite(expires) THEN
            RAISE EXCEPTION 'invalid Expires for cookie %: it must be a finite time', name
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        utc := expires AT TIME ZONE 'UTC';
        IF pg_catalog.date_part('year', utc) NOT BETWEEN 1601 AND 9999 THEN
            RAISE EXCEPTION 'invalid Expires for cookie %: the year must be between 1601 and 9999', name
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        -- RFC 1123 date, built without to_char (whose output may follow lc_time).
        cookie := cookie || '; Expires='
            || (ARRAY['Mon', 'Tue', 'Wed', 'Thu', 'Fri', 'Sat', 'Sun'])[pg_catalog.date_part('isodow', utc)::int]
            || ', ' || pg_catalog.lpad(pg_catalog.date_part('day', utc)::int::text, 2, '0')
            || ' ' || (ARRAY['Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov', 'Dec'])[pg_catalog.date_part('month', utc)::int]
            || ' ' || pg_catalog.date_part('year', utc)::int::text
            || ' ' || pg_catalog.lpad(pg_catalog.date_part('hour', utc)::int::text, 2, '0')
            || ':' || pg_catalog.lpad(pg_catalog.date_part('minute', utc)::int::text, 2, '0')
            || ':' || pg_catalog.lpad(pg_catalog.floor(pg_catalog.date_part('second', utc))::int::text, 2, '0')
            || ' GMT';
    END IF;
    IF path IS NOT NULL THEN
        IF path !~ '^[ -:<-~]*$' THEN
            RAISE EXCEPTION 'invalid Path for cookie %: only printable ASCII without ; is allowed', name
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        cookie := cookie || '; Path=' || path;
    END IF;
    IF domain IS NOT NULL THEN
        IF domain !~ '^\.?[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$' THEN
            RAISE EXCEPTION 'invalid Domain for cookie %: a host name is expected (letters, digits, - and ., punycode for others)', name
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        cookie := cookie || '; Domain=' || domain;
    END IF;
    IF secure THEN
        cookie := cookie || '; Secure';
    END IF;
    IF http_only THEN
        cookie := cookie || '; HttpOnly';
    END IF;
    IF same_site IS NOT NULL THEN
        site := pg_catalog.lower(same_site);
        IF site NOT IN ('strict', 'lax', 'none') THEN
            RAISE EXCEPTION 'invalid SameSite for cookie %: Strict, Lax or None expected', name
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF site = 'none' AND NOT coalesce(secure, false) THEN
            RAISE EXCEPTION 'cookie % has SameSite=None without Secure: browsers refuse it', name
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        cookie := cookie || '; SameSite=' || pg_catalog.initcap(site);
    END IF;
    IF name ILIKE '\_\_Secure-%' AND NOT coalesce(secure, false) THEN
        RAISE EXCEPTION 'cookie % needs secure => true (its name has the __Secure- prefix)', name
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF name ILIKE '\_\_Host-%' AND (NOT coalesce(secure, false) OR path IS DISTINCT FROM '/' OR domain IS NOT NULL) THEN
        RAISE EXCEPTION 'cookie % needs secure => true, path => ''/'' and no domain (its name has the __Host- prefix)', name
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN ROW('set-cookie', cookie)::omni_http.http_header;
END
$$;

-- 4. multipart/form-data ----------------------------------------------------------------

-- The parameters of a header value such as Content-Type or Content-Disposition
-- ('form-data; name="a"; filename=b.txt'), in order, names lower-cased, values without
-- their double quotes. In a quoted value only \" and \\ are escapes (treq and older curl
-- write `"` as \"); any other backslash is itself, as browsers send a file name's
-- backslashes unescaped (and `"` as %22, which is left as it is, WHATWG HTML). Anything
-- that is not a sequence of `; name=value` raises 22P02.
CREATE FUNCTION omni_web._header_parameters(header text)
    RETURNS TABLE (name text, value text)
    LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    rest text;
    found text[];
    tiled text;
BEGIN
    IF pg_catalog.strpos(header, ';') = 0 THEN
        RETURN;
    END IF;
    rest := pg_catalog.substr(header, pg_catalog.strpos(header, ';'));
    -- Each match starts with its `;`; the two kinds of value cannot both match at one
    -- place (one starts with `"`, the other never holds one), so the matches tile the
    -- text exactly when it is well formed, which the comparison checks.
    SELECT pg_catalog.string_agg(m.g[1], '' ORDER BY m.n),
           pg_catalog.array_agg(ARRAY[pg_catalog.lower(m.g[2]), m.g[3]] ORDER BY m.n)
               FILTER (WHERE m.g[2] IS NOT NULL)
    INTO tiled, found
    FROM pg_catalog.regexp_matches(rest,
             '([ \t]*;[ \t]*(?:([^ \t;="]+)[ \t]*=[ \t]*("(?:[^"\\]|\\.)*"|[^ \t;"]*))?[ \t]*)', 'g')
             WITH ORDINALITY AS m (g, n);
    IF tiled IS DISTINCT FROM rest THEN
        RAISE EXCEPTION 'malformed parameters in header value "%"', omni_web._shown(header)
            USING ERRCODE = 'invalid_text_representation';
    END IF;
    RETURN QUERY
        SELECT found[i][1],
               CASE WHEN pg_catalog.left(found[i][2], 1) = '"'
                    THEN pg_catalog.regexp_replace(
                             pg_catalog.substr(found[i][2], 2, pg_catalog.length(found[i][2]) - 2),
                             '\\(["\\])', '\1', 'g')
                    ELSE found[i][2] END
        FROM pg_catalog.generate_subscripts(found, 1) AS i
        ORDER BY i;
END
$$;

-- The parts of a multipart body (RFC 2046, RFC 7578). The body is split at its
-- delimiters in one pass: encode(..., 'escape') turns it into text in which bytes >= 128,
-- NUL and `\` become escapes made of `\` and digits only, and every other byte stays
-- itself; a delimiter (CR LF "--" boundary, and a boundary holds no `\`) therefore
-- matches the escaped text exactly where it matches the bytes, and string_to_array
-- splits there. A match followed by neither "--" nor white space and CR LF is content
-- that merely starts like a delimiter, and stays in its part. A part whose Content-Type
-- is multipart/mixed (curl -F 'files=@a,b', RFC 2388) is read one level deep, its files
-- named as the part.
CREATE FUNCTION omni_web._parse_multipart(data bytea, media_type text, nested boolean)
    RETURNS TABLE (part_name text, part_filename text, part_content_type text,
                   part_headers omni_http.http_header[], part_body bytea)
    LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    kind text := pg_catalog.lower(pg_catalog.btrim(pg_catalog.split_part(media_type, ';', 1), E' \t'));
    boundary text;
    delimiter text;
    pieces text[];
    piece text;
    part text;
    part_start int;            -- index in pieces of the current part's first piece; NULL: preamble
    parts text[] := ARRAY[]::text[];
    closed boolean := false;
    well_formed boolean;
    i int;
    n int;
    head_end int;
    head text;
    disposition text;
    disposition_type text;
    star text;
    field_name text;
BEGIN
    IF kind <> (CASE WHEN nested THEN 'multipart/mixed' ELSE 'multipart/form-data' END) THEN
        RAISE EXCEPTION 'not a multipart/form-data body: Content-Type is "%"', omni_web._shown(media_type)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT p.value INTO boundary FROM omni_web._header_parameters(media_type) AS p WHERE p.name = 'boundary' LIMIT 1;
    IF boundary IS NULL THEN
        RAISE EXCEPTION 'Content-Type "%" has no boundary parameter', omni_web._shown(media_type)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF boundary !~ '^[0-9A-Za-z''()+_,./:=? -]{0,69}[0-9A-Za-z''()+_,./:=?-]$' THEN
        RAISE EXCEPTION 'invalid multipart boundary "%": 1 to 70 letters, digits, spaces and ''()+_,-./:=? (not ending in a space)',
            omni_web._shown(boundary)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    delimiter := E'\r\n--' || boundary;
    -- The CR LF in front lets a body that opens with its first delimiter split like the rest.
    pieces := pg_catalog.string_to_array(E'\r\n' || pg_catalog.encode(data, 'escape'), delimiter);
    n := pg_catalog.array_length(pieces, 1);
    FOR i IN 2..n LOOP
        piece := pieces[i];
        IF pg_catalog.left(piece, 2) = '--' THEN                  -- the close delimiter
            IF part_start IS NOT NULL THEN
                parts := parts || pg_catalog.array_to_string(pieces[part_start:i - 1], delimiter);
            END IF;
            closed := true;
            EXIT;
        ELSIF piece ~ '^[ \t]*\r\n' THEN                         -- a delimiter: a part starts
            IF part_start IS NOT NULL THEN
                parts := parts || pg_catalog.array_to_string(pieces[part_start:i - 1], delimiter);
            END IF;
            pieces[i] := pg_catalog.regexp_replace(piece, '^[ \t]*\r\n', '');
            part_start := i;
        END IF;                                                   -- else: content, kept
    END LOOP;
    IF NOT closed THEN
        RAISE EXCEPTION 'multipart body ends without its closing delimiter "--%--"', boundary
            USING ERRCODE = 'invalid_text_representation';
    END IF;
    FOR i IN 1..coalesce(pg_catalog.array_length(parts, 1), 0) LOOP
        part := parts[i];
        IF pg_catalog.left(part, 2) = E'\r\n' OR part = '' THEN     -- no header at all
            head := '';
            part_body := pg_catalog.decode(pg_catalog.substr(part, 3), 'escape');
        ELSE
            head_end := pg_catalog.strpos(part, E'\r\n\r\n');
            IF head_end = 0 THEN
                RAISE EXCEPTION 'multipart part % has no empty line after its headers', i
                    USING ERRCODE = 'invalid_text_representation';
            END IF;
            BEGIN
                head := pg_catalog.convert_from(pg_catalog.decode(pg_catalog.left(part, head_end - 1), 'escape'), 'UTF8');
            EXCEPTION WHEN character_not_in_repertoire OR untranslatable_character THEN
                RAISE EXCEPTION 'the headers of multipart part % are not valid UTF-8', i
                    USING ERRCODE = 'character_not_in_repertoire', DETAIL = SQLERRM;
            END;
            part_body := pg_catalog.decode(pg_catalog.substr(part, head_end + 4), 'escape');
        END IF;
        -- Header lines; obsolete line folding (a line starting with white space) unfolded.
        SELECT pg_catalog.array_agg(ROW(pg_catalog.btrim(pg_catalog.left(l.line, pg_catalog.strpos(l.line, ':') - 1), E' \t'),
                                        pg_catalog.btrim(pg_catalog.substr(l.line, pg_catalog.strpos(l.line, ':') + 1), E' \t')
                                    )::omni_http.http_header ORDER BY l.n),
               pg_catalog.bool_and(l.line ~ '^[!#$%&''*+.^_`|~0-9A-Za-z-]+[ \t]*:')
        INTO part_headers, well_formed
        FROM pg_catalog.unnest(pg_catalog.string_to_array(
                 pg_catalog.regexp_replace(head, E'\r\n[ \t]+', ' ', 'g'), E'\r\n')) WITH ORDINALITY AS l (line, n)
        WHERE head <> '';
        IF NOT well_formed THEN
            RAISE EXCEPTION 'multipart part % has a malformed header line', i
                USING ERRCODE = 'invalid_text_representation';
        END IF;
        part_headers := coalesce(part_headers, ARRAY[]::omni_http.http_header[]);
        disposition := omni_http.http_header_get(part_headers, 'content-disposition');
        IF disposition IS NULL THEN
            RAISE EXCEPTION 'multipart part % has no Content-Disposition header', i
                USING ERRCODE = 'invalid_text_representation';
        END IF;
        disposition_type := pg_catalog.lower(pg_catalog.btrim(pg_catalog.split_part(disposition, ';', 1), E' \t'));
        IF disposition_type <> 'form-data' AND NOT (nested AND disposition_type IN ('attachment', 'file')) THEN
            RAISE EXCEPTION 'multipart part % is "%", not form-data', i, omni_web._shown(disposition_type)
                USING ERRCODE = 'invalid_text_representation';
        END IF;
        SELECT (pg_catalog.array_agg(p.value) FILTER (WHERE p.name = 'name'))[1],
               (pg_catalog.array_agg(p.value) FILTER (WHERE p.name = 'filename'))[1],
               (pg_catalog.array_agg(p.value) FILTER (WHERE p.name = 'filename*'))[1]
        INTO part_name, part_filename, star
        FROM omni_web._header_parameters(disposition) AS p;
        IF star IS NOT NULL THEN
            -- RFC 5987 ext-value, charset'language'percent-encoded: only UTF-8 is read.
            IF star !~* '^utf-8''[^'']*''' THEN
                RAISE EXCEPTION 'multipart part % has a filename* that is not in UTF-8', i
                    USING ERRCODE = 'invalid_text_representation';
            END IF;
            part_filename := omni_web._percent_decode(pg_catalog.regexp_replace(star, '^[^'']*''[^'']*''', ''), false);
        END IF;
        IF part_name IS NULL AND NOT nested THEN
            RAISE EXCEPTION 'multipart part % has no name', i
                USING ERRCODE = 'invalid_text_representation';
        END IF;
        part_content_type := omni_http.http_header_get(part_headers, 'content-type');
        IF NOT nested AND pg_catalog.lower(pg_catalog.btrim(pg_catalog.split_part(part_content_type, ';', 1), E' \t'))
                          = 'multipart/mixed' THEN
            field_name := part_name;
            RETURN QUERY
                SELECT field_name, m.part_filename, m.part_content_type, m.part_headers, m.part_body
                FROM omni_web._parse_multipart(part_body, part_content_type, true) AS m;
        ELSE
            RETURN NEXT;
        END IF;
    END LOOP;
END
$$;

-- The parts of a multipart/form-data body, in order: `content_type` is the request's
-- Content-Type header (it holds the boundary).
CREATE FUNCTION omni_web.parse_multipart(body bytea, content_type text)
    RETURNS TABLE (name text, filename text, content_type text,
                   headers omni_http.http_header[], body bytea)
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
AS $$ SELECT * FROM omni_web._parse_multipart($1, $2, false) $$;

-- Pure helpers: every role may call them (see 007_grants.sql for why it is explicit).
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA omni_web TO PUBLIC;
GRANT USAGE ON DOMAIN omni_web.params TO PUBLIC;
