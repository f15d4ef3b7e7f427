"""outcome.response_from_row: the handler-result row -> Response table of SPEC 4."""
import pytest

from omni_httpd.common import response
from omni_httpd.common.outcome import ProxyOutcome, response_from_row
from omni_httpd.common.response import Response


def row(kind="response", status=200, names=None, values=None, body=None, url=None,
        preserve_host=None):
    return (kind, status, names, values, body, url, preserve_host)


def test_no_rows_is_204_with_empty_body():
    assert response_from_row(None, "GET") == Response(status=204, headers=[], body=b"")


def test_abort():
    assert response_from_row(row(kind="abort", status=None), "GET") is response.ABORT


def test_response_as_given():
    result = response_from_row(
        row(status=201, names=["content-type", "X-Two", "x-two"],
            values=["text/plain", "a", "b"], body=b"hello"), "POST")
    assert result == Response(status=201, body=b"hello",
                              headers=[("content-type", "text/plain"), ("X-Two", "a"),
                                       ("x-two", "b")])


def test_null_status_is_200():
    assert response_from_row(row(status=None, body=b"x"), "GET").status == 200


def test_null_body_stays_null_and_empty_stays_empty():
    # (How each protocol delimits a NULL body is its own business: test_h1_abuse.)
    assert response_from_row(row(body=None), "GET").body is None
    assert response_from_row(row(body=b""), "GET").body == b""


def test_null_header_arrays():
    assert response_from_row(row(names=None, values=None, body=b"x"), "GET").headers == []


def test_memoryview_body_becomes_bytes():
    body = response_from_row(row(body=memoryview(b"abc")), "GET").body
    assert body == b"abc" and isinstance(body, bytes)


@pytest.mark.parametrize("name", ["Content-Length", "content-length", "CONTENT-LENGTH"])
def test_smaller_content_length_truncates_and_is_removed(name, warnings):
    result = response_from_row(
        row(names=["x-a", name, "x-b"], values=["1", "3", "2"], body=b"hello"), "GET")
    assert result.body == b"hel"
    assert result.headers == [("x-a", "1"), ("x-b", "2")]
    assert warnings == []


def test_equal_content_length_is_fine(warnings):
    result = response_from_row(row(names=["content-length"], values=["5"], body=b"hello"), "GET")
    assert result.body == b"hello" and result.headers == []
    assert warnings == []


def test_larger_content_length_is_ignored_with_a_warning(warnings):
    result = response_from_row(row(names=["Content-Length"], values=["50"], body=b"hello"), "GET")
    assert result.body == b"hello" and result.headers == []
    assert len(warnings) == 1
    assert "50" in str(warnings[0]["declared"]) and warnings[0]["actual"] == 5


def test_content_length_zero_empties_the_body():
    assert response_from_row(row(names=["content-length"], values=["0"], body=b"hi"), "GET").body == b""


def test_invalid_content_length_is_ignored_with_a_warning(warnings):
    result = response_from_row(row(names=["content-length"], values=["abc"], body=b"hi"), "GET")
    assert result.body == b"hi" and result.headers == []
    assert len(warnings) == 1


def test_content_length_with_null_body_is_dropped():
    result = response_from_row(row(names=["content-length"], values=["3"], body=None), "GET")
    assert result.body is None and result.headers == []


def test_head_keeps_the_body_for_its_length():
    # The protocol sends the GET's Content-Length for HEAD and no body.
    assert response_from_row(row(body=b"hello"), "HEAD").body == b"hello"


def test_null_header_name_or_value_is_skipped():
    result = response_from_row(row(names=["a", None, "c"], values=[None, "b", "c"], body=b""), "GET")
    assert result.headers == [("c", "c")]


@pytest.mark.parametrize("status", [200, 204, 301, 404, 599, 799])
def test_usable_status_is_kept(status):
    assert response_from_row(row(status=status, body=b""), "GET").status == status


def test_proxy():
    assert response_from_row(row(kind="proxy", status=None, url="http://u/x", preserve_host=False),
                             "GET") == ProxyOutcome("http://u/x", False)
    assert response_from_row(row(kind="proxy", status=None, url="http://u/x", preserve_host=True),
                             "GET") == ProxyOutcome("http://u/x", True)
    # NULL preserve_host: the SQL default (true).
    assert response_from_row(row(kind="proxy", status=None, url="http://u/x"),
                             "GET") == ProxyOutcome("http://u/x", True)


def test_proxy_without_url_is_500(warnings):
    assert response_from_row(row(kind="proxy", status=None, url=None), "GET") == response.internal_error()
    assert len(warnings) == 1


def test_unknown_kind_is_500(warnings):
    assert response_from_row(row(kind="teapot"), "GET") == response.internal_error()
    assert len(warnings) == 1
