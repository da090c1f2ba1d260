"""Print the text outputs of a stored notebook, cell by cell (a reading aid for authors)."""

import json
import sys

for path in sys.argv[1:]:
    notebook = json.load(open(path))
    for index, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] != "code":
            continue
        for output in cell.get("outputs", []):
            if "text" in output:
                print(f"[{index}] " + "".join(output["text"])[:1500])
            elif output.get("output_type") == "error":
                print(f"[{index}] ERROR {output['ename']}: {output['evalue']}")
            elif "data" in output:
                print(f"[{index}] <{', '.join(output['data'])}>")
