from setuptools import setup

setup(
    name="omni_httpd",
    version="0.1.0",
    description="HTTP server whose request handling is SQL stored in PostgreSQL",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["omni_httpd", "omni_httpd.admin_assets", "twisted.plugins"],
    package_dir={"omni_httpd.admin_assets": "admin"},
    package_data={
        "omni_httpd": ["sql/*.sql"],
        "omni_httpd.admin_assets": ["templates/*.html", "static/*"],
    },
    install_requires=[
        "twisted[tls,http2]>=23.10",
        "h2>=4.1",
        "txpostgres>=1.7",
        "psycopg2-binary>=2.9",
        "jinja2>=3.1",
        # llhttp (the C parser behind Node's HTTP) for HTTP/1: twisted.web's parser costs
        # more per request than the database round trip (see docs/performance.md).
        "httptools>=0.6",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-twisted>=1.14", "treq>=23.11"],
    },
)
