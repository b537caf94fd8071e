// Run by tests/test_go_java_clients.py: CRUD, a paged cursor, an aggregation and an index with
// Debian's Java driver (3.6, which sends its handshake and buildinfo as legacy OP_QUERY
// commands), connecting with no URI options. The 3.6 driver has no transaction API.
// Usage: java -cp DRIVER:. Smoke URI DB. Prints one JSON line; exits 1 on failure.
import com.mongodb.MongoClient;
import com.mongodb.MongoClientURI;
import com.mongodb.client.MongoCollection;
import com.mongodb.client.MongoCursor;
import com.mongodb.client.MongoDatabase;
import com.mongodb.client.model.Indexes;
import com.mongodb.event.CommandListener;
import com.mongodb.event.CommandFailedEvent;
import com.mongodb.event.CommandStartedEvent;
import com.mongodb.event.CommandSucceededEvent;
import org.bson.Document;
import org.bson.json.JsonMode;
import org.bson.json.JsonWriterSettings;

import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.concurrent.atomic.AtomicInteger;

public class Smoke {
    public static void main(String[] args) {
        String uri = args[0];
        String dbName = args[1];
        final AtomicInteger getMores = new AtomicInteger();
        CommandListener listener = new CommandListener() {
            public void commandStarted(CommandStartedEvent e) {
                if (e.getCommandName().equals("getMore")) getMores.incrementAndGet();
            }
            public void commandSucceeded(CommandSucceededEvent e) {}
            public void commandFailed(CommandFailedEvent e) {}
        };
        MongoClientURI parsed = new MongoClientURI(uri,
                com.mongodb.MongoClientOptions.builder().addCommandListener(listener)
                        .serverSelectionTimeout(10000));
        MongoClient client = new MongoClient(parsed);
        try {
            MongoDatabase db = client.getDatabase(dbName);
            MongoCollection<Document> coll = db.getCollection("items");
            List<Document> docs = new ArrayList<>();
            for (int i = 0; i < 50; i++) {
                docs.add(new Document("_id", i).append("group", i % 5).append("v", i * 2));
            }
            coll.insertMany(docs);
            String index = coll.createIndex(Indexes.ascending("group"));
            int indexes = 0;
            for (Document ignored : coll.listIndexes()) indexes++;
            Document one = coll.find(new Document("_id", 7)).first();

            List<Integer> ids = new ArrayList<>();
            MongoCursor<Document> cursor = coll.find().sort(new Document("_id", 1)).batchSize(7)
                    .iterator();
            while (cursor.hasNext()) ids.add(cursor.next().getInteger("_id"));
            cursor.close();
            int pagedGetMores = getMores.get();

            long updated = coll.updateMany(new Document("group", 0),
                    new Document("$set", new Document("flag", true))).getModifiedCount();
            long deleted = coll.deleteMany(new Document("group", 4)).getDeletedCount();
            long count = coll.count();
            List<Integer> groups = new ArrayList<>();
            for (Document g : coll.aggregate(Arrays.asList(
                    new Document("$group", new Document("_id", "$group")
                            .append("n", new Document("$sum", 1))),
                    new Document("$sort", new Document("_id", 1)))).batchSize(2)) {
                groups.add(g.getInteger("_id"));
            }
            List<String> collections = new ArrayList<>();
            for (String name : db.listCollectionNames()) collections.add(name);
            String build = client.getDatabase("admin").runCommand(new Document("buildinfo", 1))
                    .get("version").toString();

            Document out = new Document("inserted", docs.size()).append("index", index)
                    .append("indexes", indexes).append("one", one.getInteger("v"))
                    .append("ids", ids).append("getMores", pagedGetMores)
                    .append("updated", updated).append("deleted", deleted)
                    .append("count", count).append("groups", groups)
                    .append("collections", collections).append("version", build);
            System.out.println(out.toJson(new JsonWriterSettings(JsonMode.RELAXED)));
        } finally {
            client.close();
        }
    }
}
