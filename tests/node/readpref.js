// Run by tests/test_read_preference.py: reads with a read preference through the main
// port with the Node driver. Usage: node readpref.js URI. Opens cursors on rp.where with
// batchSize 2 and pages them in turn; prints one JSON line: each cursor's documents'
// `node` fields in order, and a count.
'use strict';
const { MongoClient } = require('mongodb');

async function main() {
  const [uri] = process.argv.slice(2);
  const client = new MongoClient(uri, { serverSelectionTimeoutMS: 20000, maxPoolSize: 4 });
  await client.connect();
  const out = {};
  try {
    const where = client.db('rp').collection('where');
    const cursors = [...Array(12).keys()].map(
      () => where.find({}, { sort: { _id: 1 }, batchSize: 2 }));
    out.cursors = cursors.map(() => []);
    // Page them concurrently: getMores go out on whichever pooled connection is free.
    await Promise.all(cursors.map(async (cursor, i) => {
      for await (const doc of cursor) out.cursors[i].push([doc._id, doc.node]);
    }));
    out.count = await where.countDocuments({});
  } finally {
    await client.close();
  }
  console.log(JSON.stringify(out));
}

main().catch((err) => { console.error(err); process.exit(1); });
