// Run by tests/test_node_clients.py: CRUD, cursors, aggregation and a transaction through the
// proxy with the Node driver, connecting WITHOUT directConnection. Prints one JSON line.
'use strict';
const { MongoClient } = require('mongodb');

async function main() {
  const uri = process.argv[2];
  const client = new MongoClient(uri, { monitorCommands: true, serverSelectionTimeoutMS: 10000 });
  const addresses = new Set();
  const topologyTypes = [];
  const serverAddresses = new Set();
  client.on('commandSucceeded', (e) => addresses.add(e.address));
  client.on('commandFailed', (e) => addresses.add(e.address));
  client.on('topologyDescriptionChanged', (e) => {
    topologyTypes.push(e.newDescription.type);
    for (const address of e.newDescription.servers.keys()) serverAddresses.add(address);
  });
  await client.connect();
  const out = {};
  try {
    const coll = client.db('node_clients').collection('items');
    await coll.drop().catch(() => {});
    const docs = Array.from({ length: 250 }, (_, i) => ({ _id: i, group: i % 5, v: i * 2 }));
    out.inserted = (await coll.insertMany(docs)).insertedCount;
    out.one = await coll.findOne({ _id: 7 });
    // batchSize forces getMore round trips through the proxy.
    out.ids = (await coll.find({}, { batchSize: 20 }).sort({ _id: 1 }).toArray()).map((d) => d._id);
    out.groups = await coll.aggregate([
      { $group: { _id: '$group', n: { $sum: 1 }, total: { $sum: '$v' } } },
      { $sort: { _id: 1 } },
    ], { batchSize: 2 }).toArray();
    out.updated = (await coll.updateMany({ group: 0 }, { $set: { flagged: true } })).modifiedCount;
    out.deleted = (await coll.deleteMany({ group: 4 })).deletedCount;
    out.count = await coll.countDocuments({});
    const session = client.startSession();
    try {
      await session.withTransaction(async () => {
        await coll.insertOne({ _id: 'txn' }, { session });
      });
    } finally {
      await session.endSession();
    }
    out.txn = await coll.findOne({ _id: 'txn' });
    out.hello = await client.db('admin').command({ hello: 1 });
  } finally {
    await client.close();
  }
  out.addresses = [...addresses];
  out.serverAddresses = [...serverAddresses];
  out.topologyTypes = topologyTypes;
  process.stdout.write(JSON.stringify(out) + '\n');
}

main().catch((err) => {
  process.stderr.write(String(err && err.stack || err) + '\n');
  process.exit(1);
});
