"""Shared CLI plumbing: error lines show the user's text exactly; file-system failures are one line."""

from __future__ import annotations

import errno

import pytest
import typer

from sparselm.cli._common import fail, handles_errors
from sparselm.errors import SparselmError


@pytest.mark.parametrize("text", ["bad/[red]model", "[wiki-pair] line 3: mapping values are not allowed", "a\\[b]"])
def test_fail_prints_square_brackets_as_written(capsys, text):
    assert isinstance(fail(text), typer.Exit)
    assert capsys.readouterr().err.strip() == f"error: {text}"


def test_a_full_disk_is_one_line_naming_the_file(capsys):
    @handles_errors
    def write() -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out/model.safetensors")

    with pytest.raises(typer.Exit) as exit_info:
        write()
    assert exit_info.value.exit_code == 2
    assert capsys.readouterr().err.strip() == (
        "error: No space left on device: '/data/out/model.safetensors'; free space or choose another location"
    )


def test_other_errors_are_not_disguised():
    @handles_errors
    def broken() -> None:
        raise OSError(errno.EBADF, "Bad file descriptor")

    with pytest.raises(OSError):
        broken()

    @handles_errors
    def user_error() -> None:
        raise SparselmError("x")

    with pytest.raises(typer.Exit):
        user_error()
