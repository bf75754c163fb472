"""Bad command-line arguments: one line on stderr naming the command they were given to, exit
code 2, before anything is loaded (not argparse's usage block)."""

import pytest

from bamba.cli import main


@pytest.mark.parametrize("argv,named,says", [
    (["quantize", "a", "b", "--scheme", "int3"], "bamba quantize", "invalid choice: 'int3'"),
    (["generate", "--bogus"], "bamba generate", "unrecognized arguments: --bogus"),
    (["eval", "phonebook"], "bamba eval phonebook", "required: MODEL"),
    (["nosuch"], "bamba", "invalid choice: 'nosuch'"),
])
def test_a_bad_argument_is_one_line_naming_its_command(capsys, argv, named, says) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{named}: error: ") and says in err, err
    assert f"(see {named} --help)" in err
