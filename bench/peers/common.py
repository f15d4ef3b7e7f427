"""What every peer does per request: the same SQL the daemon's handlers run, by path.

    GET  /users/<handle>  W1: the users join, HTML body           (404 when no row)
    POST /echo            W2: the request body cast to jsonb       (application/json)
    GET  /big             W3: a 256 KiB text body

Each peer prepares these statements once per database connection and runs exactly one
of them per request (one round trip), as the daemon does.
"""
W1_SQL = (
    "SELECT 'Hello, <b>' || users.name || '</b>!' "
    "FROM (SELECT $1::text AS path) AS request "
    "INNER JOIN users ON string_to_array(request.path, '/', '') = array[NULL, 'users', users.handle]"
)
W2_SQL = "SELECT convert_from($1::bytea, 'UTF8')::jsonb::text"
W3_SQL = "SELECT repeat('x', 262144)"

W1_TYPE = b"text/html"
W2_TYPE = b"application/json"
W3_TYPE = b"text/plain; charset=utf-8"
