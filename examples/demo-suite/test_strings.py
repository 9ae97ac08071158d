"""One real failure, so the summary has something to show first."""


def test_upper():
    assert "dtf".upper() == "DTF"


def test_title_case_of_an_acronym():
    assert "dtf".title() == "DTF"  # fails: "Dtf"
