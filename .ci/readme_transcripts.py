"""Re-run the README's ``$ layerscope ...`` transcripts and write what they print today.

Each transcript is a fenced block whose lines starting with ``$ layerscope`` are commands; the
lines up to the next command (or the end of the block) are that command's output. Run from
the repository root with layerscope installed:

    python .ci/readme_transcripts.py          # rewrite README.md
    python .ci/readme_transcripts.py --check  # exit 1 and name the stale ones
"""

import re
import shlex
import subprocess
import sys
from pathlib import Path

README = Path("README.md")
BLOCK = re.compile(r"^```\n(.*?)^```\n", re.S | re.M)


def rerun(block: str) -> str:
    """``block`` with every command's output replaced by what it prints now."""
    out: list[str] = []
    for part in re.split(r"^(?=\$ layerscope )", block, flags=re.M):
        if not part.startswith("$ layerscope "):
            out.append(part)
            continue
        command = part.splitlines()[0]
        argv = shlex.split(command[2:])
        done = subprocess.run([sys.executable, "-m", "layerscope", *argv[1:]], text=True,
                              capture_output=True, check=False)
        if done.returncode not in (0, 1):
            raise SystemExit(f"{command}: exit {done.returncode}\n{done.stderr}")
        trailing = "\n" if part.endswith("\n\n") and not done.stdout.endswith("\n\n") else ""
        out.append(f"{command}\n{done.stdout}{trailing}")
    return "".join(out)


def main() -> int:
    text = README.read_text()
    stale = []

    def replace(m: re.Match[str]) -> str:
        old = m.group(1)
        if "$ layerscope " not in old:
            return m.group(0)
        new = rerun(old)
        if new != old:
            stale.append(old.splitlines()[0])
        return f"```\n{new}```\n"

    updated = BLOCK.sub(replace, text)
    if "--check" in sys.argv[1:]:
        for first in stale:
            print(f"stale transcript: {first}")
        return 1 if stale else 0
    README.write_text(updated)
    print(f"{len(stale)} transcript block(s) rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
