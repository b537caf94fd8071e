// Run by tests/test_branch_masking.py: reads a masked branch with the Node driver (find with
// getMore batches, aggregate with $group and $lookup, distinct, findOneAndUpdate). Prints
// one JSON line with everything it read.
'use strict';
const { MongoClient } = require('mongodb');

async function main() {
  const [uri, dbName] = process.argv.slice(2);
  const client = new MongoClient(uri, { serverSelectionTimeoutMS: 10000 });
  await client.connect();
  const out = {};
  try {
    const db = client.db(dbName);
    out.found = await db.collection('users').find({}, { batchSize: 2 }).sort({ _id: 1 }).toArray();
    out.grouped = await db.collection('users').aggregate([
      { $group: { _id: '$email', names: { $push: '$name' } } }]).toArray();
    out.joined = await db.collection('orders').aggregate([
      { $lookup: { from: 'users', let: { u: '$user' }, as: 'who',
                   pipeline: [{ $match: { $expr: { $eq: ['$_id', '$$u'] } } }] } }]).toArray();
    out.distinct = await db.collection('users').distinct('ssn');
    out.returned = await db.collection('users').findOneAndUpdate(
      { _id: 1 }, { $set: { visits: 1 } }, { returnDocument: 'before' });
    out.filtered = await db.collection('users').countDocuments({ ssn: '111-22-3333' });
  } finally {
    await client.close();
  }
  console.log(JSON.stringify(out));
}

main().catch((err) => { console.error(err); process.exit(1); });
