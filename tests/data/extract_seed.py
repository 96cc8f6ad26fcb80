"""One-off: extract the seed's field tables and example docs into tests/data (re-run to refresh)."""
import json, re, sys
text = open(sys.argv[1]).read()
lines = text.splitlines()
# sections: "The <ds> data stream captures" starts a dataset
tables, examples = {}, {}
current = None
i = 0
while i < len(lines):
    line = lines[i]
    m = re.match(r"The (\w+) data stream captures", line)
    if m:
        current = m.group(1)
    if line.strip() == "Example" and current and lines[i+1].strip() == "{":
        # collect JSON until braces balance
        buf, depth = [], 0
        j = i + 1
        while True:
            buf.append(lines[j]); depth += lines[j].count("{") - lines[j].count("}")
            # braces inside strings (event.original) are escaped JSON, counted equally
            j += 1
            if depth == 0:
                break
        examples[current] = json.loads("\n".join(buf))
        i = j; continue
    if line.startswith("| Field |") and current:
        rows = {}
        j = i + 2
        TYPES = {"date","keyword","constant_keyword","long","double","boolean","ip","text","match_only_text","flattened","geo_point"}
        while j < len(lines) and lines[j].startswith("|"):
            row = lines[j]; j += 1
            def typed(r):
                return [c.strip() for c in r.strip().strip("|").split("|") if c.strip() in TYPES]
            while not typed(row) and j < len(lines) and not lines[j].startswith("|"):
                row += " " + lines[j]; j += 1
            cells = [c.strip() for c in row.strip().strip("|").split("|")]
            rows[cells[0]] = typed(row)[0]
        tables[current] = rows
        i = j; continue
    i += 1
json.dump({"source": "Elastic OpenAI integration 2.2.0 docs (seed 002)", "tables": tables}, open("tests/data/seed_fields.json","w"), indent=1, sort_keys=True)
json.dump(examples, open("tests/data/seed_examples.json","w"), indent=1, sort_keys=True)
print({k: len(v) for k, v in tables.items()}, list(examples))
