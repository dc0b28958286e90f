// Which record keys the reference PDS refuses for its slur filter (@atproto/pds
// `hasExplicitSlur`, applied to every record key in `repo/prepare`), so the Python check in
// replicator/tid.py can be compared with it key by key.
//
// argv[2]: the node_modules directory holding @atproto/pds; stdin: a JSON list of keys;
// stdout: a JSON list of booleans (true: refused).
import fs from 'node:fs'
import path from 'node:path'
import { pathToFileURL } from 'node:url'

const file = path.join(path.resolve(process.argv[2]), '@atproto/pds/dist/handle/explicit-slurs.js')
const { hasExplicitSlur } = await import(pathToFileURL(file).href)
const keys = JSON.parse(fs.readFileSync(0, 'utf8'))
process.stdout.write(JSON.stringify(keys.map((k) => hasExplicitSlur(k))))
