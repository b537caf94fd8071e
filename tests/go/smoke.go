// Run by tests/test_go_java_clients.py: CRUD, a paged cursor, an aggregation, an index and
// (with "txn") a WithTransaction on the port, main or branch, with the Go driver, connecting with no URI
// options. Usage: go run smoke.go URI DB [txn]. Prints one JSON line; exits 1 on failure.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"time"

	"go.mongodb.org/mongo-driver/bson"
	"go.mongodb.org/mongo-driver/event"
	"go.mongodb.org/mongo-driver/mongo"
	"go.mongodb.org/mongo-driver/mongo/options"
)

func check(err error, what string) {
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", what, err)
		os.Exit(1)
	}
}

func ids(docs []bson.M) []int32 {
	out := []int32{}
	for _, d := range docs {
		out = append(out, d["_id"].(int32))
	}
	return out
}

func main() {
	uri, dbName := os.Args[1], os.Args[2]
	withTxn := len(os.Args) > 3 && os.Args[3] == "txn"
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()

	getMores := 0
	monitor := &event.CommandMonitor{Started: func(_ context.Context, e *event.CommandStartedEvent) {
		if e.CommandName == "getMore" {
			getMores++
		}
	}}
	client, err := mongo.Connect(ctx, options.Client().ApplyURI(uri).SetMonitor(monitor))
	check(err, "connect")
	defer client.Disconnect(ctx)
	coll := client.Database(dbName).Collection("items")
	out := map[string]interface{}{}

	docs := []interface{}{}
	for i := int32(0); i < 50; i++ {
		docs = append(docs, bson.M{"_id": i, "group": i % 5, "v": i * 2})
	}
	inserted, err := coll.InsertMany(ctx, docs)
	check(err, "insertMany")
	out["inserted"] = len(inserted.InsertedIDs)

	name, err := coll.Indexes().CreateOne(ctx, mongo.IndexModel{Keys: bson.D{{Key: "group", Value: 1}}})
	check(err, "createIndex")
	out["index"] = name
	specs, err := coll.Indexes().List(ctx)
	check(err, "listIndexes")
	var indexes []bson.M
	check(specs.All(ctx, &indexes), "listIndexes.All")
	out["indexes"] = len(indexes)

	var one bson.M
	check(coll.FindOne(ctx, bson.M{"_id": 7}).Decode(&one), "findOne")
	out["one"] = one["v"]

	cursor, err := coll.Find(ctx, bson.M{}, options.Find().SetSort(bson.M{"_id": 1}).SetBatchSize(7))
	check(err, "find")
	var all []bson.M
	check(cursor.All(ctx, &all), "find.All")
	out["ids"] = ids(all)
	out["getMores"] = getMores

	updated, err := coll.UpdateMany(ctx, bson.M{"group": 0}, bson.M{"$set": bson.M{"flag": true}})
	check(err, "updateMany")
	out["updated"] = updated.ModifiedCount
	deleted, err := coll.DeleteMany(ctx, bson.M{"group": 4})
	check(err, "deleteMany")
	out["deleted"] = deleted.DeletedCount
	count, err := coll.CountDocuments(ctx, bson.M{})
	check(err, "countDocuments")
	out["count"] = count

	agg, err := coll.Aggregate(ctx, mongo.Pipeline{
		{{Key: "$group", Value: bson.M{"_id": "$group", "n": bson.M{"$sum": 1}}}},
		{{Key: "$sort", Value: bson.M{"_id": 1}}},
	}, options.Aggregate().SetBatchSize(2))
	check(err, "aggregate")
	var groups []bson.M
	check(agg.All(ctx, &groups), "aggregate.All")
	out["groups"] = ids(groups)

	names, err := client.Database(dbName).ListCollectionNames(ctx, bson.M{})
	check(err, "listCollections")
	out["collections"] = names

	if withTxn {
		session, err := client.StartSession()
		check(err, "startSession")
		_, err = session.WithTransaction(ctx, func(sc mongo.SessionContext) (interface{}, error) {
			return coll.InsertOne(sc, bson.M{"_id": int32(1000)})
		})
		check(err, "transaction")
		session.EndSession(ctx)
		n, err := coll.CountDocuments(ctx, bson.M{"_id": int32(1000)})
		check(err, "count after transaction")
		out["txn"] = n
	}

	line, err := json.Marshal(out)
	check(err, "json")
	fmt.Println(string(line))
}
