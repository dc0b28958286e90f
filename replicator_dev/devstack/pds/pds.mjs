// The reference PDS + an in-memory PLC (@atproto/dev-env), one JSON line on stdout when ready.
// SIGUSR1 stops the PDS (connections refused), SIGUSR2 starts it again on the same port with the
// same SQLite data and keys: a real PDS restart for fault tests, while the PLC keeps the DIDs.
import fs from 'node:fs/promises'
import os from 'node:os'
import path from 'node:path'
import { randomBytes } from 'node:crypto'
import { TestNetworkNoAppView, TestPds, mockNetworkUtilities } from '@atproto/dev-env'

const pdsPort = Number(process.env.PDS_PORT)
const plcPort = Number(process.env.PLC_PORT)
const dataDirectory = await fs.mkdtemp(path.join(os.tmpdir(), 'replicator-pds-'))
const pdsConfig = {
  port: pdsPort,
  dataDirectory,
  blobstoreDiskLocation: path.join(dataDirectory, 'blobs'),
  // Fixed for the life of this process, so a restarted PDS can still update its DIDs.
  plcRotationKeyK256PrivateKeyHex: randomBytes(32).toString('hex'),
  // Off unless asked: the production installer turns them on (tests of the limits do too).
  rateLimitsEnabled: process.env.PDS_RATE_LIMITS_ENABLED === 'true',
  ...(process.env.PDS_RATE_LIMIT_BYPASS_KEY
    ? { rateLimitBypassKey: process.env.PDS_RATE_LIMIT_BYPASS_KEY } : {}),
}
const network = await TestNetworkNoAppView.create({ pds: pdsConfig, plc: { port: plcPort } })
process.stdout.write(JSON.stringify({ ready: true, pds: network.pds.url, plc: network.plc.url }) + '\n')

let pdsUp = true
let busy = Promise.resolve()
const serially = (fn) => { busy = busy.then(fn).catch((err) => console.error(err)); return busy }

process.on('SIGUSR1', () => serially(async () => {
  if (!pdsUp) return
  await network.pds.close()
  pdsUp = false
  console.log('pds stopped')
}))
process.on('SIGUSR2', () => serially(async () => {
  if (pdsUp) return
  network.pds = await TestPds.create({ didPlcUrl: network.plc.url, ...pdsConfig })
  mockNetworkUtilities(network.pds)
  pdsUp = true
  console.log('pds started')
}))

let closing = false
const stop = async () => {
  if (closing) return
  closing = true
  try {
    await busy
    if (!pdsUp) await network.plc.close()
    else await network.close()
    await fs.rm(dataDirectory, { recursive: true, force: true })
  } finally { process.exit(0) }
}
process.on('SIGTERM', stop)
process.on('SIGINT', stop)
