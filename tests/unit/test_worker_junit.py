"""JUnit reports are untrusted input: parsed when sane, refused with a clear reason otherwise."""

from pathlib import Path

import pytest

from dtfd.state.tasks import JUnitCase as Case
from dtfd.worker.junit import MAX_MESSAGE_CHARS, JunitError, parse, parse_file

PYTEST_STYLE = b"""<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="1" tests="4" time="2.1">
<testcase classname="tests.test_a" name="test_ok" time="0.001"/>
<testcase classname="tests.test_a" name="test_fail" time="1,234.5"><failure message="assert 1 == 2">def test_fail():
&gt;   assert 1 == 2</failure></testcase>
<testcase classname="tests.test_a" name="test_error" time="nan"><error>fixture blew up</error></testcase>
<testcase classname="tests.test_a" name="test_skip" time=""><skipped type="pytest.skip" message="no gpu"/></testcase>
</testsuite></testsuites>"""


def test_cases_with_status_duration_and_message():
    assert parse(PYTEST_STYLE) == [
        Case("test_ok", "tests.test_a", "passed", 0.001, ""),
        Case("test_fail", "tests.test_a", "failed", 1234.5, "assert 1 == 2"),
        Case("test_error", "tests.test_a", "error", 0.0, "fixture blew up"),
        Case("test_skip", "tests.test_a", "skipped", 0.0, "no gpu"),
    ]


def test_a_single_testsuite_root_and_nested_suites():
    nested = b'<testsuite name="outer"><testsuite name="inner"><testcase name="a"/></testsuite><testcase name="b"/></testsuite>'
    assert [c.name for c in parse(nested)] == ["a", "b"]


def test_long_messages_are_cut():
    data = f'<testsuite><testcase name="a"><failure message="{"x" * 5000}"/></testcase></testsuite>'.encode()
    assert len(parse(data)[0].message) == MAX_MESSAGE_CHARS


def test_billion_laughs_is_refused():
    names = ["lol"] + [f"lol{n}" for n in range(1, 10)]
    entities = '<!ENTITY lol "lol">' + "".join(f'<!ENTITY {name} "{f"&{previous};" * 10}">' for previous, name in zip(names, names[1:]))
    data = f'<?xml version="1.0"?><!DOCTYPE lolz [{entities}]><testsuite><testcase name="&lol9;"/></testsuite>'.encode()
    with pytest.raises(JunitError, match=r"junit: refused unsafe XML \(EntitiesForbidden\)"):
        parse(data)


def test_external_entities_are_refused():
    data = b'<?xml version="1.0"?><!DOCTYPE t [<!ENTITY x SYSTEM "file:///etc/passwd">]><testsuite><testcase name="&x;"/></testsuite>'
    with pytest.raises(JunitError, match="refused unsafe XML"):
        parse(data)


@pytest.mark.parametrize(
    ("data", "message"),
    [(b"<testsuite><testcase", "malformed XML"), (b"<html/>", "root element is <html>"), (b"", "malformed XML")],
)
def test_malformed_or_foreign_xml_is_refused(data, message):
    with pytest.raises(JunitError, match=message):
        parse(data)


def test_oversized_file_is_refused_before_reading(tmp_path: Path):
    path = tmp_path / "report.xml"
    with path.open("wb") as f:
        f.truncate(17 << 20)  # sparse: 17 MiB without writing them
    with pytest.raises(JunitError, match=r"report.xml is 17825792 bytes, over the 16777216-byte cap"):
        parse_file(path, 16 << 20)


def test_missing_file(tmp_path: Path):
    with pytest.raises(JunitError, match="report.xml was not written"):
        parse_file(tmp_path / "report.xml", 1 << 20)
