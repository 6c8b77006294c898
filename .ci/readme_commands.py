"""Print the README's set-up commands: the fenced bash blocks under "## Set-up", in order.

CI runs what this prints, so an edit of the README is what CI runs.
Usage: python3 .ci/readme_commands.py N   (N = 1 or 2)
"""

import re
import sys
from pathlib import Path

text = Path(__file__).resolve().parent.parent.joinpath("README.md").read_text(encoding="utf-8")
section = re.search(r"^## Set-up.*?$(.*?)^## ", text, re.S | re.M)
if section is None:
    sys.exit("README.md has no '## Set-up' section")
blocks = re.findall(r"^```bash\n(.*?)^```", section.group(1), re.S | re.M)
if len(blocks) < 2:
    sys.exit(f"README.md's Set-up section has {len(blocks)} bash blocks; two are needed")
print(blocks[int(sys.argv[1]) - 1].strip())
