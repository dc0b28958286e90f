// Validate records with the reference implementation, @atproto/lexicon, so the Python
// validator can be checked against it case by case.
//
// stdin:  {"lexicons": [doc, ...], "cases": [{"name": str, "record": any, "nsid"?: str}]}
//         or {"docs": [{"name": str, "doc": any}]}: lexicon documents, through
//         `parseLexiconDoc`, as `lex check`-style tools check them.
// stdout: {"<name>": {"valid": true} | {"valid": false, "error": str}, ...}
// nsid defaults to "computer.aesthetic.mood".
//
// The package is ESM-only and ESM ignores NODE_PATH, so it is resolved from the
// node_modules directory given as argv[2] (or the first NODE_PATH entry) and imported by
// file URL.
import { createRequire } from 'node:module'
import path from 'node:path'
import { pathToFileURL } from 'node:url'

const nodeModules = process.argv[2] ?? (process.env.NODE_PATH ?? '').split(path.delimiter)[0]
if (!nodeModules) {
  console.error('usage: node validate_lexicon.mjs <node_modules dir>  (or set NODE_PATH)')
  process.exit(2)
}
const require = createRequire(path.join(path.resolve(nodeModules), 'noop.js'))
const { Lexicons, parseLexiconDoc } = await import(
  pathToFileURL(require.resolve('@atproto/lexicon')).href
)

const chunks = []
for await (const chunk of process.stdin) chunks.push(chunk)
const { lexicons = [], cases = [], docs = [] } = JSON.parse(Buffer.concat(chunks).toString('utf8'))

const out = {}
for (const { name, doc } of docs) {
  try {
    parseLexiconDoc(doc)
    out[name] = { valid: true }
  } catch (err) {
    out[name] = { valid: false, error: String(err?.message ?? err) }
  }
}
const lex = new Lexicons(lexicons)
for (const { name, record, nsid = 'computer.aesthetic.mood' } of cases) {
  try {
    lex.assertValidRecord(nsid, record)
    out[name] = { valid: true }
  } catch (err) {
    out[name] = { valid: false, error: String(err?.message ?? err) }
  }
}
process.stdout.write(JSON.stringify(out) + '\n')
