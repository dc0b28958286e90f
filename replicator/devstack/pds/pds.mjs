// Starts the reference PDS + an in-memory PLC (@atproto/dev-env) and prints one JSON line when ready.
import { TestNetworkNoAppView } from '@atproto/dev-env'

const pdsPort = Number(process.env.PDS_PORT)
const plcPort = Number(process.env.PLC_PORT)
const network = await TestNetworkNoAppView.create({
  pds: { port: pdsPort },
  plc: { port: plcPort },
})
process.stdout.write(JSON.stringify({ ready: true, pds: network.pds.url, plc: network.plc.url }) + '\n')

let closing = false
const stop = async () => {
  if (closing) return
  closing = true
  try { await network.close() } finally { process.exit(0) }
}
process.on('SIGTERM', stop)
process.on('SIGINT', stop)
