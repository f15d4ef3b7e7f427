"""tap.Options: every option of SPEC section 2, from argv or OMNI_HTTPD_* variables, into
Settings; invalid values end option parsing with one line on stderr and exit status 2."""
import datetime
import os

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from omni_httpd.master import tap
from omni_httpd.common.settings import Settings


def parse(argv, environ=None):
    options = tap.Options(environ=environ if environ is not None else {})
    options.parseOptions(argv)
    return options.settings


def parse_error(capsys, argv, environ=None):
    """The one stderr line of a rejected command line."""
    with pytest.raises(SystemExit) as exit_info:
        parse(argv, environ)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("omni_httpd: error: ")
    return lines[0]


def write(path, data, mode=0o644):
    with open(path, "wb" if isinstance(data, bytes) else "w") as handle:
        handle.write(data)
    os.chmod(path, mode)
    return str(path)


def make_pair(directory, name):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return (write(directory / (name + ".crt"), cert_pem),
            write(directory / (name + ".key"), key_pem, 0o600),
            write(directory / (name + ".pem"), cert_pem + key_pem, 0o600))


def test_no_options_gives_the_settings_defaults():
    settings = parse([])
    assert settings == Settings()
    assert settings.dsn is None and settings.init and settings.access_log
    assert settings.http_workers == (os.cpu_count() or 1)
    assert settings.admin == "tcp:8081:interface=127.0.0.1"
    assert (settings.init_listen_address, settings.init_port) == ("127.0.0.1", 8080)


def test_every_option_reaches_its_setting(tmp_path):
    password_file = write(tmp_path / "password", "s3cret\n", 0o600)
    cert, key, _both = make_pair(tmp_path, "server")
    settings = parse([
        "--dsn", "host=/run/postgresql dbname=web",
        "--data-dir", str(tmp_path / "data"),
        "--http-workers", "3",
        "--no-init",
        "--init-port", "0",
        "--init-listen-address", "::1",
        "--admin", "tcp:9000:interface=127.0.0.2",
        "--admin-password-file", password_file,
        "--tls-cert", cert, "--tls-key", key,
        "--max-body", "1M",
        "--max-header-size", "8192",
        "--header-timeout", "5",
        "--body-timeout", "6.5",
        "--idle-timeout", "7",
        "--shutdown-grace", "2",
        "--handler-timeout", "1.5",
        "--no-access-log",
    ])
    assert settings == Settings(
        dsn="host=/run/postgresql dbname=web", data_dir=str(tmp_path / "data"), http_workers=3,
        init=False, init_port=0, init_listen_address="::1", admin="tcp:9000:interface=127.0.0.2",
        admin_password=None, admin_password_file=password_file, tls_cert=cert, tls_key=key,
        max_body=1024 * 1024, max_header_size=8192, header_timeout=5.0, body_timeout=6.5,
        idle_timeout=7.0, shutdown_grace=2.0, handler_timeout=1.5, access_log=False)
    assert isinstance(settings.http_workers, int) and isinstance(settings.header_timeout, float)


@pytest.mark.parametrize("value", ["none", "None", "off", ""])
def test_admin_console_can_be_disabled(value):
    assert parse(["--admin", value]).admin is None


def test_admin_password():
    assert parse(["--admin-password", "hunter2"]).admin_password == "hunter2"


def test_proxy_and_console_exposure_options():
    defaults = parse([])
    assert (defaults.trust_forwarded, defaults.proxy_allow, defaults.proxy_deny,
            defaults.admin_hosts) == (False, "any", "", "")
    settings = parse(["--trust-forwarded", "--proxy-allow", "10.0.0.0/8, Loopback",
                      "--proxy-deny", "link-local,10.0.0.1",
                      "--admin-host", "Console.Example.", "--admin-host", "ops.example,[::1]"])
    assert settings.trust_forwarded is True
    assert settings.proxy_allow == "10.0.0.0/8,loopback"
    assert settings.proxy_deny == "link-local,10.0.0.1/32"
    assert settings.admin_hosts == "console.example,ops.example,::1"
    from_env = parse([], {"OMNI_HTTPD_TRUST_FORWARDED": "yes", "OMNI_HTTPD_ADMIN_HOST": "a.example,b.example",
                          "OMNI_HTTPD_PROXY_DENY": "loopback"})
    assert (from_env.trust_forwarded, from_env.admin_hosts, from_env.proxy_deny) == (
        True, "a.example,b.example", "loopback")


def test_environment_variables_and_the_command_line_wins(tmp_path):
    environ = {
        "OMNI_HTTPD_HTTP_WORKERS": "5",
        "OMNI_HTTPD_INIT_PORT": "9090",
        "OMNI_HTTPD_DSN": "dbname=from_env",
        "OMNI_HTTPD_DATA_DIR": str(tmp_path),
        "OMNI_HTTPD_ADMIN": "none",
        "OMNI_HTTPD_MAX_BODY": "2k",
        "OMNI_HTTPD_SHUTDOWN_GRACE": "3",
    }
    settings = parse(["--init-port", "7070", "--dsn", "dbname=from_argv"], environ)
    assert settings.init_port == 7070
    assert settings.dsn == "dbname=from_argv"
    assert settings.http_workers == 5
    assert settings.data_dir == str(tmp_path)
    assert settings.admin is None
    assert settings.max_body == 2048
    assert settings.shutdown_grace == 3.0


@pytest.mark.parametrize("value, expected", [
    ("1", False), ("true", False), ("YES", False), ("on", False),
    ("0", True), ("false", True), ("no", True), ("", True),
])
def test_flags_from_the_environment(value, expected):
    settings = parse([], {"OMNI_HTTPD_NO_INIT": value, "OMNI_HTTPD_NO_ACCESS_LOG": value})
    assert settings.init is expected
    assert settings.access_log is expected


def test_a_flag_on_the_command_line_is_not_undone_by_the_environment():
    assert parse(["--no-init"], {"OMNI_HTTPD_NO_INIT": "0"}).init is False


def test_empty_environment_variable_counts_as_unset():
    assert parse([], {"OMNI_HTTPD_HTTP_WORKERS": "", "OMNI_HTTPD_DSN": ""}) == Settings()


@pytest.mark.parametrize("value, expected", [
    ("0", 0), ("100", 100), ("16M", 16 * 1024 ** 2), ("16MiB", 16 * 1024 ** 2),
    ("3k", 3072), ("1G", 1024 ** 3), ("5 MB", 5 * 1024 ** 2),
])
def test_sizes(value, expected):
    assert parse(["--max-body", value]).max_body == expected


def test_tls_key_defaults_to_the_certificate_file(tmp_path):
    _cert, _key, both = make_pair(tmp_path, "both")
    settings = parse(["--tls-cert", both])
    assert settings.tls_cert == settings.tls_key == both


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "pw", "x\n")
    settings = parse(["--data-dir", "data", "--admin-password-file", "pw"])
    assert settings.data_dir == str(tmp_path / "data")
    assert settings.admin_password_file == str(tmp_path / "pw")


@pytest.mark.parametrize("argv, expected", [
    (["--http-workers", "abc"], "--http-workers: expected a number of workers between 1 and 1024, got 'abc'"),
    (["--http-workers", "0"], "--http-workers: expected a number of workers between 1 and 1024, got 0"),
    (["--init-port", "65536"], "--init-port: expected a port number between 0 and 65535, got 65536"),
    (["--init-port", "-1"], "--init-port: expected a port number between 0 and 65535, got -1"),
    (["--init-listen-address", "localhost"], "--init-listen-address: expected an IPv4 or IPv6 address"),
    (["--admin", "tcp:notaport"], "--admin: invalid endpoint 'tcp:notaport'"),
    (["--admin", "carrier-pigeon:1"], "--admin: invalid endpoint 'carrier-pigeon:1'"),
    (["--admin", "tcp:70000"], "--admin: invalid endpoint 'tcp:70000': port 70000 out of range"),
    (["--dsn", "host=x ==="], "--dsn: not a valid PostgreSQL connection string"),
    (["--dsn", ""], "--dsn: must not be empty"),
    (["--max-body", "lots"], "--max-body: expected a size in bytes"),
    (["--header-timeout", "-1"], "--header-timeout: expected a non-negative number of seconds"),
    (["--idle-timeout", "nan"], "--idle-timeout: expected a non-negative number of seconds"),
    (["--shutdown-grace", "soon"], "--shutdown-grace: expected a number of seconds, got 'soon'"),
    (["--tls-cert", "/nonexistent/cert.pem"], "--tls-cert: cannot read /nonexistent/cert.pem: No such file"),
    (["--admin-password-file", "/nonexistent/pw"], "--admin-password-file: cannot read /nonexistent/pw"),
    (["--proxy-allow", "localhost"], "--proxy-allow: 'localhost' is neither an address, a network"),
    (["--proxy-deny", "10.0.0.0/33"], "--proxy-deny: '10.0.0.0/33' is neither an address"),
    (["--proxy-allow", " , "], "--proxy-allow: must name at least one address"),
    (["--admin-host", "console.example:8081"], "--admin-host: 'console.example:8081': give the name without a port"),
    (["--admin-host", "a b"], "--admin-host: 'a b' is not a host name or IP address"),
    (["--admin-host", "ok.example", "--admin-host", "bad/name"], "--admin-host: 'bad/name' is not a host name"),
    (["--bogus"], "option --bogus not recognized"),
    (["--http-workers"], "option --http-workers requires argument"),
    (["stray"], "Wrong number of arguments."),
])
def test_invalid_values_are_one_line_errors(capsys, argv, expected):
    assert expected in parse_error(capsys, argv)


@pytest.mark.parametrize("name, value, expected", [
    ("OMNI_HTTPD_HTTP_WORKERS", "many", "OMNI_HTTPD_HTTP_WORKERS: expected a number of workers"),
    ("OMNI_HTTPD_INIT_PORT", "99999", "OMNI_HTTPD_INIT_PORT: expected a port number"),
    ("OMNI_HTTPD_NO_INIT", "perhaps", "OMNI_HTTPD_NO_INIT: expected 1/true/yes/on or 0/false/no/off"),
])
def test_invalid_environment_values_name_the_variable(capsys, name, value, expected):
    assert expected in parse_error(capsys, [], {name: value})


def test_an_invalid_environment_value_is_ignored_when_the_command_line_gives_one():
    assert parse(["--http-workers", "2"], {"OMNI_HTTPD_HTTP_WORKERS": "many"}).http_workers == 2


def test_data_dir_that_is_a_file(capsys, tmp_path):
    path = write(tmp_path / "file", "x")
    assert "--data-dir: %s exists and is not a directory" % path in parse_error(capsys, ["--data-dir", path])


def test_password_file_problems(capsys, tmp_path):
    empty = write(tmp_path / "empty", "\n")
    assert "is empty" in parse_error(capsys, ["--admin-password-file", empty])
    good = write(tmp_path / "good", "pw\n")
    assert "mutually exclusive" in parse_error(
        capsys, ["--admin-password", "pw", "--admin-password-file", good])


def test_unreadable_file(capsys, tmp_path):
    path = write(tmp_path / "cert.pem", "x", 0o000)
    if os.geteuid() == 0:
        # root reads any file: a directory is just as unreadable as a file
        path = str(tmp_path)
    assert "--tls-cert: cannot read %s" % path in parse_error(capsys, ["--tls-cert", path])


def test_tls_problems(capsys, tmp_path):
    cert, key, _both = make_pair(tmp_path, "one")
    _cert2, other_key, _both2 = make_pair(tmp_path, "two")
    garbage = write(tmp_path / "garbage.pem", "not pem at all\n")
    assert "--tls-key needs --tls-cert" in parse_error(capsys, ["--tls-key", key])
    assert "--tls-cert: %s is not a PEM certificate" % garbage in parse_error(
        capsys, ["--tls-cert", garbage, "--tls-key", key])
    assert "--tls-key: %s is not a PEM private key" % garbage in parse_error(
        capsys, ["--tls-cert", cert, "--tls-key", garbage])
    assert "--tls-key: %s does not match the certificate %s" % (other_key, cert) in parse_error(
        capsys, ["--tls-cert", cert, "--tls-key", other_key])
    assert "is not a PEM private key" in parse_error(capsys, ["--tls-cert", cert])  # no key in it


def test_encrypted_tls_key_is_refused_without_prompting(capsys, tmp_path):
    cert, key, _both = make_pair(tmp_path, "locked")
    with open(key, "rb") as handle:
        private_key = serialization.load_pem_private_key(handle.read(), password=None)
    locked = write(tmp_path / "locked-enc.key", private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase")), 0o600)
    assert "--tls-key: %s is encrypted" % locked in parse_error(capsys, ["--tls-cert", cert, "--tls-key", locked])


def test_static_roots(tmp_path, capsys):
    one, two = tmp_path / "one", tmp_path / "a,b"     # a directory with a comma in its name
    one.mkdir()
    two.mkdir()
    assert parse([]).static_roots == {}
    settings = parse(["--static-root", "site=%s" % one, "--static-root", "odd.name-1=%s" % two])
    assert settings.static_roots == {"site": str(one), "odd.name-1": str(two)}
    from_env = parse([], {"OMNI_HTTPD_STATIC_ROOT": "a=%s, b=%s" % (one, one)})
    assert from_env.static_roots == {"a": str(one), "b": str(one)}
    for argv, expected in (
            (["--static-root", str(one)], "--static-root: expected NAME=DIR"),
            (["--static-root", "x=%s" % (tmp_path / "missing")], "is not a directory"),
            (["--static-root", "a/b=%s" % one], "--static-root: root name 'a/b'"),
            (["--static-root", "a=%s" % one, "--static-root", "a=%s" % two], "root name 'a' given twice")):
        assert expected in parse_error(capsys, argv)
