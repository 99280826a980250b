"""Image placeholders in chat text never reach vLLM, however they are nested."""

from __future__ import annotations

import pytest

from services.llava.api import IMAGE_PLACEHOLDER, without_placeholders


@pytest.mark.parametrize(
    "text", ["<image>", "a <image> b", "<<image>image>", "<<<image>image>image>", "<im<image>age>x"]
)
def test_no_placeholder_survives(text):
    assert IMAGE_PLACEHOLDER not in without_placeholders(text)


def test_other_text_is_kept():
    assert without_placeholders("an <img> tag and <images>") == "an <img> tag and <images>"
