// Run by tests/test_node_clients.py: the catalog and paged cursors with the Node driver, which
// reads cursor ids only as BSON int64 (as mongod sends them). Usage: node cursors.js URI DB.
// The database holds `items` (_id 0-19) and an index on `n`; one document is changed first,
// so that on a branch port the proxy serves the collection itself. Prints one JSON line.
'use strict';
const { MongoClient } = require('mongodb');

async function main() {
  const [uri, dbName] = process.argv.slice(2);
  const client = new MongoClient(uri, { monitorCommands: true, serverSelectionTimeoutMS: 10000 });
  const getMores = {};
  let current = null;
  client.on('commandStarted', (e) => {
    if (e.commandName === 'getMore' && current) getMores[current] = (getMores[current] || 0) + 1;
  });
  await client.connect();
  const out = {};
  try {
    const db = client.db(dbName);
    const items = db.collection('items');
    await items.updateOne({ _id: 0 }, { $set: { touched: true } });
    out.collections = (await db.listCollections().toArray()).map((c) => c.name).sort();
    out.named = (await db.listCollections({ name: 'items' }).toArray()).map((c) => c.name);
    out.nameOnly = (await db.listCollections({}, { nameOnly: true, batchSize: 1 }).toArray())
      .map((c) => c.name).sort();
    out.collectionNames = (await db.collections()).map((c) => c.collectionName).sort();
    out.indexes = (await items.listIndexes().toArray()).map((i) => i.name).sort();
    out.indexExists = await items.indexExists('n_1');

    current = 'find';
    const cursor = items.find({}, { batchSize: 3 }).sort({ _id: 1 });
    out.ids = [];
    for await (const doc of cursor) out.ids.push(doc._id);
    current = 'findLimit';
    out.limited = (await items.find({ n: { $gte: 5 } }, { batchSize: 2, limit: 7 })
      .sort({ n: -1 }).toArray()).map((d) => d._id);
    current = 'aggregate';
    out.aggregated = (await items.aggregate([{ $sort: { _id: 1 } }, { $project: { _id: 1 } }],
      { batchSize: 4 }).toArray()).map((d) => d._id);
    current = 'closed';
    const early = items.find({}, { batchSize: 2 }).sort({ _id: 1 });
    out.early = [(await early.next())._id, (await early.next())._id, (await early.next())._id];
    await early.close();
    current = null;
    out.count = await items.countDocuments({ n: { $lt: 10 } });
    out.distinct = (await items.distinct('n', { n: { $lt: 3 } })).sort((a, b) => a - b);
    out.getMores = getMores;
  } finally {
    await client.close();
  }
  process.stdout.write(JSON.stringify(out) + '\n');
}

main().catch((err) => {
  process.stderr.write(String(err && err.stack || err) + '\n');
  process.exit(1);
});
