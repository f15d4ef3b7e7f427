# The twistd plugin: `twistd -n omni_httpd [options]`. All the work is in omni_httpd.master.tap.
# (No __init__.py in this directory: Twisted's plugin package collects every
# twisted/plugins directory on sys.path.)
from twisted.application.service import ServiceMaker

omni_httpd = ServiceMaker(
    "omni_httpd",
    "omni_httpd.master.tap",
    "HTTP server whose request handlers are SQL queries stored in PostgreSQL",
    "omni_httpd",
)
