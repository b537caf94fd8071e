// Run by tests/test_branch_changestream.py: the Node driver's change streams on a branch
// port. Usage: node changestream.js URI DB. Writes on `items` while a stream watches it,
// resumes after the first event, and watches the database and the whole branch. Prints one
// JSON line.
'use strict';
const { MongoClient } = require('mongodb');

const brief = (e) => ({ op: e.operationType, key: e.documentKey && e.documentKey._id,
  full: e.fullDocument, before: e.fullDocumentBeforeChange, ns: e.ns,
  updated: e.updateDescription && e.updateDescription.updatedFields });

async function main() {
  const [uri, dbName] = process.argv.slice(2);
  const client = new MongoClient(uri, { serverSelectionTimeoutMS: 10000 });
  await client.connect();
  const out = {};
  try {
    const db = client.db(dbName);
    const items = db.collection('items');
    const stream = items.watch([], { maxAwaitTimeMS: 200, fullDocument: 'updateLookup',
      fullDocumentBeforeChange: 'whenAvailable' });
    const whole = client.watch([{ $match: { operationType: 'delete' } }], { maxAwaitTimeMS: 200 });
    const dbStream = db.watch([], { maxAwaitTimeMS: 200 });
    // The streams are open (their aggregate answered) before the first write.
    await Promise.all([stream.tryNext(), whole.tryNext(), dbStream.tryNext()]);
    await items.insertOne({ _id: 'n1', v: 1 });
    await items.updateOne({ _id: 'n1' }, { $set: { v: 2 } });
    await items.deleteOne({ _id: 'n1' });
    const events = [await stream.next(), await stream.next(), await stream.next()];
    out.events = events.map(brief);
    out.whole = brief(await whole.next());
    out.db = brief(await dbStream.next());
    await Promise.all([stream.close(), whole.close(), dbStream.close()]);
    const again = items.watch([], { resumeAfter: events[0]._id, maxAwaitTimeMS: 200 });
    out.resumed = [brief(await again.next()).op, brief(await again.next()).op];
    await again.close();
  } finally {
    await client.close();
  }
  console.log(JSON.stringify(out));
}

main().catch((err) => { console.error(err); process.exit(1); });
