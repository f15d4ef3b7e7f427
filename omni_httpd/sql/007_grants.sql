-- Handlers run as whatever role handlers.role_name names: every role may use the API
-- (types, constructors, header helpers, default_page). Functions are executable by
-- PUBLIC by default, but a database may have revoked that with ALTER DEFAULT
-- PRIVILEGES, so say it explicitly. Nothing here gives access to the configuration
-- tables: the functions that touch them run with the caller's rights.
-- (A later migration that adds functions must grant them itself.)

GRANT USAGE ON SCHEMA omni_http, omni_httpd TO PUBLIC;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA omni_http, omni_httpd TO PUBLIC;
GRANT USAGE ON TYPE
    omni_http.http_method, omni_http.http_header, omni_http.http_headers,
    omni_httpd.http_request, omni_httpd.http_response, omni_httpd.http_proxy,
    omni_httpd.http_outcome, omni_httpd.http_protocol, omni_httpd._handler_result
    TO PUBLIC;
